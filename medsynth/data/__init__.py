"""Cohorts (manifests from phantom, BraTS or a user CSV), validation, the 2D-instance dataset.

Names are imported on first use so that light modules (the manifest, the phantom generator)
do not pull in MONAI and torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "resolve_cohort": "medsynth.data.cohort",
    "detect_source": "medsynth.data.cohort",
    "cohort_summary": "medsynth.data.cohort",
    "make_slice_dataset": "medsynth.data.dataset",
    "SliceDataset": "medsynth.data.dataset",
    "patient_volume_transforms": "medsynth.data.dataset",
    "atlas_volume_transforms": "medsynth.data.dataset",
    "slice_table": "medsynth.data.dataset",
    "validate_cohort": "medsynth.data.validation",
    "brats_cohort": "medsynth.data.adapters",
    "user_csv_cohort": "medsynth.data.adapters",
    "build_group_atlas": "medsynth.data.adapters",
    "read_manifest": "medsynth.data.manifest",
    "write_manifest": "medsynth.data.manifest",
    "split_patients": "medsynth.data.manifest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medsynth.data' has no attribute {name!r}")

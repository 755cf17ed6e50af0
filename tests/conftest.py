"""Shared fixtures. Real data lives in ../shared/data beside the checkout and is never in git."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(
    os.environ.get("MEDSYNTH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def _shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


@pytest.fixture(scope="session")
def brats_dir() -> Path:
    """The 8 BraTS 2018 development cases."""
    return _shared("brats2018_dev")


@pytest.fixture(scope="session")
def tcga_dir() -> Path:
    """The raw TCGA-FG-6692 exam with its reference brain mask."""
    return _shared("tcga_fg_6692_raw")


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    """The Siemens XA30 DICOM series with dcm2niix reference conversions."""
    return _shared("dicom_xa30i")


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    # Tests run two workers on two cores: one intra-op thread each avoids oversubscription.
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture
def from_repository_root(monkeypatch):
    """Run from the repository root, as the bundles' documented commands do (their ``%`` macros
    name files relative to it); a module asks for it with ``pytest.mark.usefixtures``."""
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def tiny_phantom_cache(tmp_path_factory) -> str:
    """A cache holding the tiny phantom cohort of the bundle tests (3 patients of 40x40x6 voxels),
    generated once per module so that the bundles reuse it."""
    from medsynth.data.cohort import resolve_cohort

    path = str(tmp_path_factory.mktemp("cache"))
    resolve_cohort("", path, phantom_patients=3, phantom_shape=(40, 40, 6), progress=False)
    return path

"""The config files a bundle's workflow runs, for a base bundle or one derived from another.

A *base* bundle (``bundles/cg_samr``) holds complete configs: ``train.json``, ``evaluate.json`` (an
override of ``train.json``), ``inference.json``, ``multi_gpu_train.json``, ``paper.json``. A
*derived* bundle (``bundles/samr``) holds only its differences from a base, in one override file,
and names the base in its ``metadata.json``::

    "derived_from": {"bundle": "../cg_samr", "overrides": "samr.json"}

Its workflows are the base's with the override file inserted after the base's first config, which
is what its documented commands list (``bundles/README.md``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["WORKFLOWS", "bundle_config_files", "parse_overrides"]

# Workflow -> the base bundle's config files, in merge order.
WORKFLOWS: dict[str, tuple[str, ...]] = {
    "train": ("train.json",),
    "evaluate": ("train.json", "evaluate.json"),
    "inference": ("inference.json",),
    "multi_gpu_train": ("train.json", "multi_gpu_train.json"),
    "paper": ("train.json", "paper.json"),
}


def bundle_config_files(bundle_dir: str | os.PathLike, workflow: str = "train") -> list[str]:
    """The config files of ``workflow`` (a key of :data:`WORKFLOWS`) for the bundle in ``bundle_dir``.

    Raises:
        FileNotFoundError: ``bundle_dir`` is not a bundle (no ``configs/metadata.json``), or a file is
        missing.
        ValueError: unknown workflow.
    """
    if workflow not in WORKFLOWS:
        raise ValueError(f"unknown workflow {workflow!r}; choose one of {sorted(WORKFLOWS)}")
    bundle = Path(bundle_dir)
    metadata_path = bundle / "configs" / "metadata.json"
    if not metadata_path.is_file():
        raise FileNotFoundError(f"{bundle} is not a bundle: no configs/metadata.json")
    derived = json.loads(metadata_path.read_text()).get("derived_from")
    if derived:
        base = bundle / derived["bundle"]
        names = WORKFLOWS[workflow]
        files = [base / "configs" / names[0], bundle / "configs" / derived["overrides"]]
        files += [base / "configs" / name for name in names[1:]]
    else:
        files = [bundle / "configs" / name for name in WORKFLOWS[workflow]]
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"bundle {bundle}: missing config file(s) {missing}")
    return [os.path.normpath(path) for path in files]


def parse_overrides(items: list[str]) -> dict[str, object]:
    """``ID=VALUE`` command-line overrides as a dict; values are read as JSON when they can be."""
    overrides: dict[str, object] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"expected ID=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides

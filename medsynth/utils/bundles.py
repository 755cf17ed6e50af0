"""The config files a bundle's workflow runs, for a base bundle or one derived from another.

A *base* bundle (``bundles/cg_samr``) holds complete configs: ``train.json``, ``evaluate.json`` (an
override of ``train.json``), ``inference.json``, ``multi_gpu_train.json``, ``paper.json``. A
*derived* bundle (``bundles/samr``) holds only its differences from a base, in one override file,
and names the base in its ``metadata.json``::

    "derived_from": {"bundle": "../cg_samr", "overrides": "samr.json"}

Its workflows are the base's with the override file inserted after the base's first config, which
is what its documented commands list (``bundles/README.md``). A derived bundle whose training
differs from the base's (another trainer, other discriminators: pix2pix) adds
``"train_overrides": "<name>_train.json"``, inserted next in the workflows built on ``train.json``
only (MONAI cannot merge ``train#...`` keys into ``inference.json``); and its own copy of one of the
base's later configs (``paper.json``) replaces the base's. ``overrides`` and ``train_overrides`` may
be lists naming another derived bundle's files (``"../../pix2pix/configs/pix2pix.json"``: Shin et al.
is pix2pix with tissue maps); that bundle's later configs then come before the base's.
``"workflow_overrides": {"evaluate": "<name>_evaluate.json"}`` appends a file to one workflow, after
the base's configs of that workflow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = [
    "OPTIONAL_WORKFLOWS",
    "WORKFLOWS",
    "add_bundle_arguments",
    "as_flag",
    "bundle_config_files",
    "parse_overrides",
    "require_trained_model",
]

# Workflow -> the base bundle's config files, in merge order: those of every mask-to-image bundle.
WORKFLOWS: dict[str, tuple[str, ...]] = {
    "train": ("train.json",),
    "evaluate": ("train.json", "evaluate.json"),
    "inference": ("inference.json",),
    "augment": ("inference.json", "augment.json"),
    "multi_gpu_train": ("train.json", "multi_gpu_train.json"),
    "paper": ("train.json", "paper.json"),
}
# Workflows only some bundles have: bundles/sfm_gan's cohort from noise.
OPTIONAL_WORKFLOWS: dict[str, tuple[str, ...]] = {"synthesize": ("train.json", "synthesize.json")}


def bundle_config_files(bundle_dir: str | os.PathLike, workflow: str = "train") -> list[str]:
    """The config files of ``workflow`` (:data:`WORKFLOWS`, :data:`OPTIONAL_WORKFLOWS`) of ``bundle_dir``.

    Raises:
        FileNotFoundError: ``bundle_dir`` is not a bundle (no ``configs/metadata.json``), or a file is
        missing.
        ValueError: unknown workflow.
    """
    known = {**WORKFLOWS, **OPTIONAL_WORKFLOWS}
    if workflow not in known:
        raise ValueError(f"unknown workflow {workflow!r}; choose one of {sorted(known)}")
    bundle = Path(bundle_dir)
    metadata_path = bundle / "configs" / "metadata.json"
    if not metadata_path.is_file():
        raise FileNotFoundError(f"{bundle} is not a bundle: no configs/metadata.json")
    derived = json.loads(metadata_path.read_text()).get("derived_from")
    if derived:
        base = bundle / derived["bundle"]
        names = known[workflow]
        overrides = [bundle / "configs" / name for name in _as_list(derived["overrides"])]
        files = [base / "configs" / names[0], *overrides]
        if names[0] == "train.json" and derived.get("train_overrides"):
            files += [bundle / "configs" / name for name in _as_list(derived["train_overrides"])]
        # A later config: the bundle's own, else that of the bundle whose overrides it reuses,
        # else the base's.
        folders = [bundle / "configs", *(path.parent for path in reversed(overrides)), base / "configs"]
        for name in names[1:]:
            files.append(next((f / name for f in folders if (f / name).is_file()), base / "configs" / name))
        # Additions to one workflow of the base, after its configs (UCG-SAMR's Table IV in evaluate).
        extra = derived.get("workflow_overrides", {}).get(workflow)
        files += [bundle / "configs" / name for name in _as_list(extra)] if extra else []
    else:
        files = [bundle / "configs" / name for name in known[workflow]]
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"bundle {bundle}: missing config file(s) {missing}")
    return [os.path.normpath(path) for path in files]


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


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


def add_bundle_arguments(parser, output_help: str) -> None:
    """The ``--bundle``, ``--output-dir`` and ``--set`` options of the commands that run a bundle workflow."""
    parser.add_argument(
        "--bundle", type=Path, default=Path("bundles/cg_samr"), help="bundle folder (default: %(default)s)"
    )
    parser.add_argument("--output-dir", default=None, help=output_help)
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="ID=VALUE",
        help="other config overrides, e.g. image_size=256 num_res_blocks=9 (values read as JSON if possible)",
    )


def require_trained_model(output_dir: str | os.PathLike | None, role: str) -> Path:
    """The weights ``OUTPUT_DIR/models/model.pt`` of a training run, for the commands that use one.

    Raises:
        ValueError: no output folder given (``role`` says what it is for).
        FileNotFoundError: no trained model in it.
    """
    if output_dir is None:
        raise ValueError(f"--output-dir is required: the training output folder of {role}")
    model = Path(output_dir) / "models" / "model.pt"
    if not model.is_file():
        raise FileNotFoundError(
            f"no trained model at {model}: train the bundle first (or check --output-dir)"
        )
    return model


def as_flag(value: object, name: str = "setting") -> bool:
    """A yes/no setting as a bool. The bundle CLI (fire) passes ``--amp false`` as the string
    ``"false"``, which Python would read as true; strings are therefore parsed, and anything that is
    not clearly yes or no is refused."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0", ""):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")

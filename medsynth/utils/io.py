"""Atomic file writing: a crash or kill never leaves a half-written output behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medsynth.utils.errors import reports_input_problems


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    The temporary name keeps the final suffixes (``.nii.gz``, ``.png``) so that writers which
    infer the format from the name work unchanged. On any exception the temporary file is removed
    and ``path`` is left as it was. A kill leaves no chance to remove it: the temporary files a
    killed writer of the same ``path`` left behind are removed by the next write of it (one target
    has one writer at a time here: the cohort cache is locked, workers write distinct files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    for leftover in path.parent.glob(f".{glob_escape(path.name)}.*{glob_escape(suffix)}"):
        leftover.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates the file 0600; give the output the permissions a plain open() would.
    os.chmod(tmp_path, 0o666 & ~_current_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype: Any = None) -> Path:
    """Write ``array`` with ``affine`` to ``path`` atomically; returns the path."""
    data = np.asarray(array)
    if dtype is not None:
        data = data.astype(dtype)
    image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    return Path(path)


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    return Path(path)


def save_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # torch tensors (e.g. values that went through a DataLoader)
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@reports_input_problems
def require_writable_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Make ``path`` (and its parents) and check that files can be written there, before any work
    starts; a file in its place or an unwritable place is refused by name."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_check_"):
            pass
    except OSError as error:
        raise PermissionError(
            f"{what} {path} cannot be written ({error.strerror or error}): choose another folder or fix "
            "its permissions"
        ) from error
    return path

"""DICOM to NIfTI through dcm2niix (Rorden et al.), the field's converter: classic, Siemens mosaic,
enhanced multi-frame and compressed series, all series of a folder at once.

The binary is the one the ``dcm2niix`` PyPI wheel ships (no download at run time). What comes out is
made identifier-free here, not trusted to the converter's options alone:

* gzip-compressed files (``.dcm.gz``, or any file starting with the gzip magic number) are inflated
  into a temporary folder first (dcm2niix does not read them);
* dcm2niix runs with an anonymised sidecar (``-ba y``) and output names from the series number only
  (``-f series_%s``); its console output, which can echo header text, is kept out of the log (only
  the return code and the number of files are logged);
* the sidecar is then filtered through the project's allow-list
  (:data:`preprocessing.dicom.SIDECAR_FIELDS`' BIDS names; SeriesDescription and ProtocolName only
  with ``free_text``), so nothing else dcm2niix may write can reach the output;
* outputs are written atomically into ``out_dir``; a series dcm2niix splits (echoes, several
  orientations) keeps dcm2niix's suffix after ``series_<N>``. A multi-volume series is a 4D NIfTI;
  the anatomical pipeline refuses 4D input with a message naming the file.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

from medsynth.errors import InputDataError
from medsynth.utils.io import atomic_path, save_json
from preprocessing.dicom import FREE_TEXT_FIELDS, SIDECAR_FIELDS, is_gzipped
from preprocessing.roles import RoleAssignment, RoleRules, assign_roles

logger = logging.getLogger(__name__)

__all__ = [
    "allowed_sidecar",
    "convert_exam",
    "convert_with_dcm2niix",
    "dcm2niix_executable",
    "load_dicom_folder",
    "series_stem",
]

# (offset, size) of the NIfTI-1 header's free-text fields: descrip and aux_file.
_FREE_TEXT_HEADER_FIELDS = ((148, 80), (228, 24))
# dcm2niix writes these under the same BIDS names as the project's reader; the conversion record is
# kept too (no header content).
_ALLOWED = frozenset(name for name, _ in SIDECAR_FIELDS.values()) | {
    "ConversionSoftware",
    "ConversionSoftwareVersion",
}


def dcm2niix_executable() -> str:
    """The dcm2niix binary of the installed ``dcm2niix`` wheel.

    Raises:
        FileNotFoundError: the wheel is not installed.
    """
    try:
        import dcm2niix
    except ImportError:
        raise FileNotFoundError("dcm2niix is not installed: pip install dcm2niix") from None
    return str(dcm2niix.bin_path)


def allowed_sidecar(sidecar: dict, free_text: bool = False) -> dict:
    """Only the allow-listed fields of a dcm2niix sidecar (the free-text ones with ``free_text``)."""
    free = {name for keyword, (name, _) in SIDECAR_FIELDS.items() if keyword in FREE_TEXT_FIELDS}
    return {k: v for k, v in sidecar.items() if k in _ALLOWED and (free_text or k not in free)}


def _inflated_copy(folder: Path, scratch: Path) -> int:
    """Copy the folder's files into ``scratch``, gzip-inflated where compressed; returns the count.

    NIfTI files (a label or a reference beside the DICOM) are not DICOM and are left out.
    """
    count = 0
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and not p.name.lower().endswith((".nii", ".nii.gz"))
    )
    for index, path in enumerate(files):
        target = scratch / f"{index:06d}.dcm"
        if is_gzipped(path):
            with gzip.open(path, "rb") as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)
        else:
            shutil.copyfile(path, target)
        count += 1
    return count


@contextmanager
def _dcm2niix_series(folder: Path) -> Iterator[list[tuple[Path, dict]]]:
    """Run dcm2niix on ``folder`` into a temporary folder; yields ``(nifti, raw sidecar)`` per output.

    The raw sidecar is dcm2niix's anonymised one (``-ba y``) *before* the allow-list: it may hold free
    text, so callers use it in memory only. The temporary folder is removed on exit.

    Raises:
        InputDataError: no file in the folder, or dcm2niix converted nothing (named by folder only).
    """
    if not folder.is_dir():
        raise InputDataError("DICOM folder does not exist", path=folder)
    with tempfile.TemporaryDirectory(prefix="medsynth_dcm2niix_") as work:
        scratch, converted = Path(work) / "in", Path(work) / "out"
        scratch.mkdir()
        converted.mkdir()
        if _inflated_copy(folder, scratch) == 0:
            raise InputDataError("no file in the DICOM folder", path=folder)
        command = [dcm2niix_executable(), "-b", "y", "-ba", "y", "-z", "y", "-f", "series_%s"]
        command += ["-o", str(converted), str(scratch)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        outputs = sorted(converted.glob("*.nii.gz"))
        logger.info("dcm2niix: return code %d, %d volume(s) from %s", result.returncode, len(outputs), folder)
        if not outputs:
            raise InputDataError(
                f"dcm2niix converted no series (return code {result.returncode}): "
                "not DICOM, or a kind it does not support",
                path=folder,
            )
        series = []
        for nifti in outputs:
            sidecar_path = nifti.with_name(nifti.name[: -len(".nii.gz")] + ".json")
            series.append((nifti, json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}))
        yield series


def _cleared_header(nifti: Path) -> bytes:
    """The gzipped NIfTI with its free-text header fields blanked.

    dcm2niix writes header text there: ``descrip`` (echo time, acquisition time) and ``aux_file``
    (the DICOM ImageComments, which sites fill freely). The bytes are patched in place, so voxels,
    scaling and geometry stay dcm2niix's.
    """
    raw = bytearray(gzip.decompress(nifti.read_bytes()))
    if int.from_bytes(raw[:4], "little") != 348 and int.from_bytes(raw[:4], "big") != 348:
        raise InputDataError("dcm2niix wrote a header that is not NIfTI-1", path=nifti.name)
    for offset, size in _FREE_TEXT_HEADER_FIELDS:
        raw[offset : offset + size] = bytes(size)
    return gzip.compress(bytes(raw), compresslevel=6)


def _write_series(nifti: Path, sidecar: dict, out_dir: Path, free_text: bool) -> tuple[Path, Path]:
    stem = nifti.name[: -len(".nii.gz")]
    target, sidecar_target = out_dir / nifti.name, out_dir / f"{stem}.json"
    with atomic_path(target) as tmp:
        tmp.write_bytes(_cleared_header(nifti))
    save_json(allowed_sidecar(sidecar, free_text), sidecar_target)
    return target, sidecar_target


def series_stem(path: str | os.PathLike) -> str:
    """``series_5001`` of ``.../series_5001.nii.gz``."""
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem


def convert_with_dcm2niix(
    folder: str | os.PathLike, out_dir: str | os.PathLike, free_text: bool = False, overwrite: bool = False
) -> list[Path]:
    """Convert every series of ``folder`` with dcm2niix into ``out_dir/series_<N>[...].nii.gz`` + ``.json``.

    Args:
        folder: DICOM folder (searched recursively).
        out_dir: output folder.
        free_text: keep SeriesDescription and ProtocolName in the sidecars.
        overwrite: rewrite outputs that exist (otherwise they are kept: resumable).

    Returns:
        The NIfTI and JSON paths written, sorted.

    Raises:
        InputDataError: no DICOM file, or dcm2niix converted nothing (named by folder only).
    """
    out_dir = Path(out_dir)
    written: list[Path] = []
    with _dcm2niix_series(Path(folder)) as series:
        out_dir.mkdir(parents=True, exist_ok=True)
        for nifti, sidecar in series:
            target, sidecar_target = out_dir / nifti.name, out_dir / f"{series_stem(nifti)}.json"
            if not (target.exists() and sidecar_target.exists()) or overwrite:
                _write_series(nifti, sidecar, out_dir, free_text)
            written += [target, sidecar_target]
    return sorted(written)


def convert_exam(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    rules: RoleRules | None = None,
    patient_id: str | None = None,
) -> tuple[dict[str, Path], RoleAssignment]:
    """Convert a raw DICOM exam (every series of ``folder``) and give its series their roles.

    The roles are decided on dcm2niix's sidecars before the allow-list (see :mod:`preprocessing.roles`);
    what is written is the allow-listed sidecar, so no free text reaches ``out_dir``.

    Returns:
        ``(paths, assignment)``: every converted series stem -> its NIfTI in ``out_dir``, and the roles.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _dcm2niix_series(Path(folder)) as series:
        paths = {series_stem(n): _write_series(n, s, out_dir, free_text=False)[0] for n, s in series}
        assignment = assign_roles({series_stem(n): s for n, s in series}, rules, patient_id)
    return paths, assignment


def load_dicom_folder(folder: str | os.PathLike, volume: int | None = None) -> nib.Nifti1Image:
    """The one series of a sequence's DICOM folder, converted by dcm2niix, as an in-memory image.

    Args:
        folder: a folder holding one DICOM series (classic, mosaic, multi-frame; plain or gzipped).
        volume: the volume to take from a multi-volume series (``None``: refused, naming the folder).

    Raises:
        InputDataError: several series in the folder, a 4D series without ``volume``, or no series.
    """
    from preprocessing.imageio import load_image

    folder = Path(folder)
    with _dcm2niix_series(folder) as series:
        if len(series) > 1:
            stems = ", ".join(series_stem(n) for n, _ in series)
            raise InputDataError(
                f"holds {len(series)} series ({stems}); a sequence folder holds one (or give the whole "
                "exam folder, without sequence folders, so that roles come from the headers)",
                path=folder,
            )
        nifti = series[0][0]
        try:
            image = load_image(nifti, volume=volume)
        except InputDataError as err:
            raise InputDataError(f"series {series_stem(nifti)} {err.problem}", path=folder) from None
        # The temporary file goes when this block ends: hold the voxels in memory.
        return nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, image.header)

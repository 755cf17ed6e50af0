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
from pathlib import Path

from medsynth.errors import InputDataError
from medsynth.utils.io import atomic_path, save_json
from preprocessing.dicom import FREE_TEXT_FIELDS, GZIP_MAGIC, SIDECAR_FIELDS

logger = logging.getLogger(__name__)

__all__ = ["allowed_sidecar", "convert_with_dcm2niix", "dcm2niix_executable"]

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
    """Copy the folder's files into ``scratch``, gzip-inflated where compressed; returns the count."""
    count = 0
    for index, path in enumerate(sorted(p for p in folder.rglob("*") if p.is_file())):
        with open(path, "rb") as handle:
            compressed = handle.read(2) == GZIP_MAGIC
        target = scratch / f"{index:06d}.dcm"
        if compressed:
            with gzip.open(path, "rb") as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)
        else:
            shutil.copyfile(path, target)
        count += 1
    return count


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
    folder, out_dir = Path(folder), Path(out_dir)
    if not folder.is_dir():
        raise InputDataError("DICOM folder does not exist", path=folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medsynth_dcm2niix_") as work:
        scratch, converted = Path(work) / "in", Path(work) / "out"
        scratch.mkdir()
        converted.mkdir()
        if _inflated_copy(folder, scratch) == 0:
            raise InputDataError("no file in the DICOM folder", path=folder)
        command = [
            dcm2niix_executable(),
            "-b",
            "y",
            "-ba",
            "y",
            "-z",
            "y",
            "-f",
            "series_%s",
            "-o",
            str(converted),
            str(scratch),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        outputs = sorted(converted.glob("*.nii.gz"))
        logger.info("dcm2niix: return code %d, %d volume(s) from %s", result.returncode, len(outputs), folder)
        if not outputs:
            raise InputDataError(
                f"dcm2niix converted no series (return code {result.returncode}): "
                "not DICOM, or a kind it does not support",
                path=folder,
            )
        written: list[Path] = []
        for nifti in outputs:
            stem = nifti.name[: -len(".nii.gz")]
            target, sidecar_target = out_dir / nifti.name, out_dir / f"{stem}.json"
            if target.exists() and sidecar_target.exists() and not overwrite:
                written += [target, sidecar_target]
                continue
            sidecar_path = converted / f"{stem}.json"
            sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}
            with atomic_path(target) as tmp:
                shutil.copyfile(nifti, tmp)
            save_json(allowed_sidecar(sidecar, free_text), sidecar_target)
            written += [target, sidecar_target]
    return sorted(written)

"""pydicom version differences the project meets (pydicom 3 in the main environment, 2.4 in the
serving one, where MONAI Label's pydicom-seg needs it)."""

from __future__ import annotations

import os

__all__ = ["save_dicom"]


def save_dicom(dataset, path: str | os.PathLike) -> None:
    """Write ``dataset`` as a conformant DICOM file (preamble, file meta): pydicom 3's
    ``enforce_file_format=True``, which pydicom 2 spells ``write_like_original=False``."""
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        dataset.save_as(path, enforce_file_format=True)
    else:
        dataset.save_as(path, write_like_original=False)

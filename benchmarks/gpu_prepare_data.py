"""Shrink the BraTS development cases to fit the GPU machine's carried-files limit (64 MiB in all).

Every case's volumes are cropped to one box, the union over all cases of the voxels where any
sequence is non-zero (BraTS volumes share the SRI24 grid, so one box keeps them on one grid; the
affine's origin moves with the crop, so world coordinates are unchanged), and written with the
same file names. The images are stored in 8 bits: clipped to [0, p99.9 of the brain] and scaled to
0-255, with the NIfTI slope restoring the intensity units (the models scale [0, p99.5] to [-1, 1]
and are scored on a 0-255 scale, so 8 bits lose next to nothing; the label maps are unchanged).

Usage::

    python benchmarks/gpu_prepare_data.py --source ../shared/data/brats2018_dev --out .gpu_carry/brats2018_dev
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from medsynth.data.adapters import find_brats_cases
from medsynth.utils.io import atomic_path, save_nifti


def brain_box(cases: dict[str, dict[str, str]], margin: int = 2) -> tuple[slice, ...]:
    """The box holding every case's non-zero voxels, ``margin`` voxels wider on each side."""
    union = None
    for files in cases.values():
        for key, path in files.items():
            if key == "seg":
                continue
            nonzero = np.asanyarray(nib.load(path).dataobj) != 0
            union = nonzero if union is None else union | nonzero
    box = []
    for axis, size in enumerate(union.shape):
        occupied = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(max(int(occupied[0]) - margin, 0), min(int(occupied[-1]) + margin + 1, size)))
    return tuple(box)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    cases = find_brats_cases(args.source)
    if not cases:
        print(f"no BraTS case in {args.source}", file=sys.stderr)
        return 2
    box = brain_box(cases)
    nib.openers.Opener.default_compresslevel = 9  # nibabel's default (1) would undo the crop's saving
    for case, files in cases.items():
        for key, path in files.items():
            image = nib.load(path)
            data = np.asanyarray(image.dataobj)[box]
            affine = image.affine.copy()
            affine[:3, 3] = image.affine[:3, :3] @ np.array([s.start for s in box]) + image.affine[:3, 3]
            target = args.out / case / Path(path).name
            if key == "seg":
                save_nifti(data, affine, target, dtype=np.uint8)
                continue
            upper = float(np.percentile(data[data > 0], 99.9)) if (data > 0).any() else 1.0
            quantized = np.rint(np.clip(data, 0, upper) * (255.0 / upper)).astype(np.uint8)
            out = nib.Nifti1Image(quantized, affine)
            out.header.set_slope_inter(upper / 255.0, 0.0)
            with atomic_path(target) as tmp:
                nib.save(out, tmp)
    shape = [s.stop - s.start for s in box]
    print(
        f"{len(cases)} cases cropped to {shape} voxels (box {[(s.start, s.stop) for s in box]}) in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

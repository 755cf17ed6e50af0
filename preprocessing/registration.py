"""Rigid / affine co-registration with ANTs, and resampling onto a reference grid.

Transform convention (the ANTs / ITK one, stated once and used everywhere here): a registration of
``moving`` to ``fixed`` estimates the map ``T`` that sends a **fixed** world point to the **moving**
world point showing the same anatomy; resampling ``moving`` on the ``fixed`` grid reads
``moving(T(x))`` at every fixed voxel centre ``x``. Matrices in this module are 4x4 in world
**RAS+** millimetres (nibabel's convention); ITK stores the same map in LPS, the conversion is
``M_ras = F @ M_lps @ F`` with ``F = diag(-1, -1, 1, 1)``.

Chains compose by matrix product: if ``A`` maps reference points to hub points and ``B`` maps hub
points to moving points, the reference-to-moving map is ``B @ A``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# ITK reads this once, when its first multi-threader is created: set it before ANTs runs so that
# the metric sums are evaluated in a fixed order (bitwise reproducible registrations).
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

import ants
import nibabel as nib
import numpy as np

from medsynth.utils.io import atomic_path, save_json
from preprocessing.imageio import from_ants, to_ants

logger = logging.getLogger(__name__)

__all__ = [
    "TRANSFORM_TYPES",
    "RegistrationResult",
    "load_transform",
    "read_ants_affine",
    "register_to_reference",
    "resample_to_reference",
    "rigid_matrix",
    "save_transform",
    "transform_displacement",
    "write_ants_affine",
]

TRANSFORM_TYPES: dict[str, str] = {"rigid": "Rigid", "affine": "Affine"}
INTERPOLATIONS = ("linear", "nearestNeighbor", "bSpline", "genericLabel")
_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class RegistrationResult:
    """Outcome of one registration.

    Attributes:
        warped: the moving image resampled on the fixed grid.
        matrix: 4x4 RAS map from fixed world points to moving world points (ANTs convention).
        transform_files: ANTs transform files (``.mat``) usable with ``ants.apply_transforms``;
            empty when no output folder was given.
        metric: Mattes mutual information between fixed and warped inside the fixed mask
            (ANTs sign: more negative is better).
    """

    warped: nib.Nifti1Image
    matrix: np.ndarray
    transform_files: list[str] = field(default_factory=list)
    metric: float = float("nan")


def rigid_matrix(
    rotation_deg: Sequence[float] = (0.0, 0.0, 0.0),
    translation_mm: Sequence[float] = (0.0, 0.0, 0.0),
    center: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """A 4x4 rigid map: rotation about ``center`` (degrees about x, then y, then z) plus translation."""
    ax, ay, az = np.deg2rad(np.asarray(rotation_deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    rotation = rz @ ry @ rx
    center = np.asarray(center, dtype=float)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = center - rotation @ center + np.asarray(translation_mm, dtype=float)
    return matrix


def read_ants_affine(path: str | os.PathLike) -> np.ndarray:
    """Read an ANTs/ITK affine ``.mat`` file as a 4x4 RAS matrix (fixed point -> moving point)."""
    transform = ants.read_transform(str(path))
    params = np.asarray(transform.parameters, dtype=float)
    if params.size != 12:
        raise ValueError(f"{path}: expected a 3D affine transform (12 parameters), got {params.size}")
    linear = params[:9].reshape(3, 3)
    translation = params[9:]
    center = np.asarray(transform.fixed_parameters, dtype=float)
    lps = np.eye(4)
    lps[:3, :3] = linear
    lps[:3, 3] = translation + center - linear @ center
    return _LPS_RAS @ lps @ _LPS_RAS


def write_ants_affine(matrix: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a 4x4 RAS matrix (fixed point -> moving point) as an ANTs ``.mat`` file, atomically."""
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (4, 4) or not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise ValueError(f"expected a 4x4 affine matrix, got\n{matrix}")
    lps = _LPS_RAS @ matrix @ _LPS_RAS
    transform = ants.create_ants_transform(
        transform_type="AffineTransform",
        dimension=3,
        matrix=lps[:3, :3],
        offset=lps[:3, 3],
        center=(0.0, 0.0, 0.0),
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        ants.write_transform(transform, str(tmp))
    return path


def save_transform(matrix: np.ndarray, path_stem: str | os.PathLike, **meta) -> dict[str, Path]:
    """Store a transform twice: ANTs ``<stem>.mat`` and ``<stem>.json`` (4x4 RAS matrices + convention)."""
    stem = Path(path_stem)
    mat = write_ants_affine(matrix, stem.with_suffix(".mat"))
    record = {
        "convention": "RAS mm; 'fixed_to_moving' maps a point of the fixed (reference) space to the "
        "moving image's space (ANTs/ITK resampling convention); 'moving_to_fixed' is its inverse",
        "fixed_to_moving": np.asarray(matrix, dtype=float).tolist(),
        "moving_to_fixed": np.linalg.inv(matrix).tolist(),
        **meta,
    }
    js = save_json(record, stem.with_suffix(".json"))
    return {"mat": mat, "json": js}


def load_transform(path: str | os.PathLike) -> np.ndarray:
    """Load a transform written by :func:`save_transform` (``.json`` or ``.mat``) as fixed-to-moving RAS."""
    path = Path(path)
    if path.suffix == ".json":
        import json

        return np.asarray(json.loads(path.read_text())["fixed_to_moving"], dtype=float)
    return read_ants_affine(path)


@contextmanager
def _ants_seed(seed: int | None) -> Iterator[None]:
    # antspy passes --random-seed only through its module-level setting; set it for this call only.
    # ANTs reads a seed of 0 as "seed from the clock", hence the shift by one.
    previous = ants.config._random_seed
    ants.config._random_seed = None if seed is None else int(seed) + 1
    try:
        yield
    finally:
        ants.config._random_seed = previous


def _metric_mask(fixed: ants.ANTsImage, fixed_mask, exclude_mask) -> ants.ANTsImage | None:
    if fixed_mask is None and exclude_mask is None:
        return None
    mask = np.ones(fixed.shape, dtype=np.uint8)
    if fixed_mask is not None:
        mask &= (to_ants(fixed_mask).numpy() > 0).astype(np.uint8)
    if exclude_mask is not None:
        exclude = to_ants(exclude_mask)
        if exclude.shape != fixed.shape:
            exclude = ants.resample_image_to_target(exclude, fixed, interp_type="nearestNeighbor")
        mask &= (exclude.numpy() == 0).astype(np.uint8)
    if not mask.any():
        raise ValueError("the registration metric mask is empty (fixed_mask minus exclude_mask)")
    return fixed.new_image_like(mask.astype(np.float32))


MIN_SHRUNK_SIZE = 32
MIN_METRIC_SAMPLES = 50_000


def _cap_shrink_factors(shrink_factors: Sequence[int], *shapes: Sequence[int]) -> tuple[int, ...]:
    # A coarse level smaller than ~32 voxels in-plane carries too little anatomy to steer the
    # optimiser (small or low-resolution images): keep its smoothing, use less shrinking.
    in_plane = min(sorted(shape)[-2] for shape in shapes)
    cap = max(1, in_plane // MIN_SHRUNK_SIZE)
    return tuple(int(min(s, cap)) for s in shrink_factors)


def register_to_reference(
    moving: nib.Nifti1Image,
    fixed: nib.Nifti1Image,
    transform: str = "rigid",
    moving_mask: nib.Nifti1Image | None = None,
    fixed_mask: nib.Nifti1Image | None = None,
    exclude_mask: nib.Nifti1Image | None = None,
    initial_matrix: np.ndarray | None = None,
    initialization: str = "identity",
    iterations: Sequence[int] = (100, 50, 25),
    shrink_factors: Sequence[int] = (4, 2, 1),
    smoothing_sigmas: Sequence[float] = (2, 1, 0),
    sampling_rate: float = 0.25,
    histogram_bins: int | None = None,
    seed: int = 0,
    out_prefix: str | os.PathLike | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with Mattes mutual information (ANTs).

    Args:
        moving: image to align.
        fixed: reference image; the result lives on its grid.
        transform: ``"rigid"`` or ``"affine"``.
        moving_mask: optional mask restricting the metric in the moving image.
        fixed_mask: optional mask restricting the metric in the fixed image.
        exclude_mask: optional mask (e.g. a lesion) removed from the metric region of the fixed image.
        initial_matrix: starting fixed-to-moving RAS matrix; overrides ``initialization``.
        initialization: ``"identity"`` (trust the scanner coordinates: same-session series) or
            ``"center_of_mass"`` (align intensity centroids first: different sessions or scanners).
        iterations: gradient-descent iterations per resolution level.
        shrink_factors: downsampling per level (capped so a level keeps >= 32 voxels in-plane).
        smoothing_sigmas: Gaussian smoothing per level, in voxels.
        sampling_rate: fraction of voxels (regular grid with seeded jitter) used by the metric; raised
            for small fixed images so that at least 50 000 voxels are sampled.
        histogram_bins: bins of the joint histogram; ``None``: 32, or 16 when fewer than 100 000 voxels
            are sampled (sparse histograms make small-image registrations unstable).
        seed: random seed (>= 0) of the metric sampling: same seed, same result.
        out_prefix: where to keep the ANTs transform file (``<prefix>.mat``) and ``<prefix>.json``;
            a temporary folder is used (and removed) when ``None``.

    Returns:
        A :class:`RegistrationResult`.
    """
    if transform not in TRANSFORM_TYPES:
        raise ValueError(f"unknown transform {transform!r}; choose one of {sorted(TRANSFORM_TYPES)}")
    if not (len(iterations) == len(shrink_factors) == len(smoothing_sigmas)):
        raise ValueError("iterations, shrink_factors and smoothing_sigmas need one entry per level")
    fixed_ants = to_ants(fixed).clone("float")
    moving_ants = to_ants(moving).clone("float")
    shrink_factors = _cap_shrink_factors(shrink_factors, fixed_ants.shape, moving_ants.shape)
    # Small fixed images: sample more densely so the joint histogram still gets enough points.
    sampling_rate = min(1.0, max(float(sampling_rate), MIN_METRIC_SAMPLES / float(np.prod(fixed_ants.shape))))
    if histogram_bins is None:
        histogram_bins = 32 if sampling_rate * np.prod(fixed_ants.shape) >= 100_000 else 16
    metric_mask = _metric_mask(fixed_ants, fixed_mask, exclude_mask)
    moving_metric_mask = None
    if moving_mask is not None:
        moving_metric_mask = moving_ants.new_image_like((to_ants(moving_mask).numpy() > 0).astype(np.float32))

    with tempfile.TemporaryDirectory(prefix="medsynth_reg_") as workdir:
        if initial_matrix is not None:
            initial = [str(write_ants_affine(initial_matrix, Path(workdir) / "init.mat"))]
        elif initialization == "identity":
            initial = [str(write_ants_affine(np.eye(4), Path(workdir) / "init.mat"))]
        elif initialization == "center_of_mass":
            initial = None  # antspy's default: [fixed, moving, 1] = centroid alignment
        else:
            raise ValueError(f"unknown initialization {initialization!r}; use 'identity' or 'center_of_mass'")
        with _ants_seed(seed):
            result = ants.registration(
                fixed_ants,
                moving_ants,
                type_of_transform=TRANSFORM_TYPES[transform],
                initial_transform=initial,
                outprefix=str(Path(workdir) / "reg_"),
                mask=metric_mask,
                moving_mask=moving_metric_mask,
                mask_all_stages=True,
                aff_metric="mattes",
                aff_sampling=histogram_bins,
                aff_random_sampling_rate=sampling_rate,
                aff_iterations=tuple(iterations),
                aff_shrink_factors=tuple(shrink_factors),
                aff_smoothing_sigmas=tuple(smoothing_sigmas),
            )
        # The .mat holds the full map (the initial transform is composed into it by antsRegistration -z 1).
        matrix = read_ants_affine(result["fwdtransforms"][-1])
        if len(result["fwdtransforms"]) > 1:
            raise RuntimeError(f"unexpected transform list from ANTs: {result['fwdtransforms']}")
    warped_ants = result["warpedmovout"]
    metric = (
        float(ants.image_mutual_information(fixed_ants, warped_ants))
        if metric_mask is None
        else float(ants.image_mutual_information(fixed_ants * metric_mask, warped_ants * metric_mask))
    )
    files: list[str] = []
    if out_prefix is not None:
        paths = save_transform(matrix, out_prefix, transform=transform, metric=metric, seed=seed)
        files = [str(paths["mat"])]
    warped = from_ants(warped_ants, like=fixed)
    return RegistrationResult(warped=warped, matrix=matrix, transform_files=files, metric=metric)


def resample_to_reference(
    img: nib.Nifti1Image,
    reference: nib.Nifti1Image,
    transforms: np.ndarray | Sequence[str] | None = None,
    interpolation: str = "linear",
    default_value: float = 0.0,
) -> nib.Nifti1Image:
    """Resample ``img`` on the grid of ``reference``.

    Args:
        img: image to resample.
        reference: defines the output grid (shape and affine).
        transforms: ``None`` (the two images already share world coordinates), a 4x4 RAS matrix
            mapping reference points to ``img`` points, or a list of ANTs transform files in the
            ``ants.apply_transforms`` order.
        interpolation: ``linear``, ``nearestNeighbor`` (labels, masks), ``bSpline`` or ``genericLabel``.
        default_value: value outside ``img``.

    Returns:
        The resampled image, with the reference's affine; label interpolations keep integer values.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {INTERPOLATIONS}")
    source_dtype = np.asanyarray(img.dataobj).dtype
    moving_ants = to_ants(img)
    if interpolation in ("linear", "bSpline"):
        moving_ants = moving_ants.clone("float")
    fixed_ants = ants.from_numpy(np.zeros(reference.shape[:3], dtype=np.float32))
    fixed_ants = to_ants(nib.Nifti1Image(np.zeros(reference.shape[:3], np.float32), reference.affine))
    with tempfile.TemporaryDirectory(prefix="medsynth_resample_") as workdir:
        if transforms is None:
            files = [str(write_ants_affine(np.eye(4), Path(workdir) / "identity.mat"))]
        elif isinstance(transforms, np.ndarray):
            files = [str(write_ants_affine(transforms, Path(workdir) / "matrix.mat"))]
        else:
            files = [str(t) for t in transforms]
        warped = ants.apply_transforms(
            fixed_ants,
            moving_ants,
            transformlist=files,
            interpolator=interpolation,
            defaultvalue=default_value,
        )
    data = warped.numpy()
    if interpolation in ("nearestNeighbor", "genericLabel") and np.issubdtype(source_dtype, np.integer):
        data = np.rint(data).astype(source_dtype)
    elif interpolation in ("linear", "bSpline"):
        data = data.astype(np.float32)
    out = nib.Nifti1Image(data, reference.affine)
    out.header.set_xyzt_units("mm")
    return out


def transform_displacement(estimated: np.ndarray, truth: np.ndarray, points_ras: np.ndarray) -> np.ndarray:
    """Distance (mm) between where two fixed-to-moving maps send each of ``points_ras`` (N, 3)."""
    points = np.c_[np.asarray(points_ras, dtype=float), np.ones(len(points_ras))]
    delta = (points @ np.asarray(estimated, float).T - points @ np.asarray(truth, float).T)[:, :3]
    return np.linalg.norm(delta, axis=1)

"""Nyúl & Udupa piecewise-linear histogram standardization (IEEE TMI 2000), one model per sequence.

Training (:meth:`NyulStandardizer.fit`, on the training split only): for every image, the intensity
percentiles ``p_1 < ... < p_m`` inside the brain mask are computed; the first and last are the
cut-offs ``pc1, pc2``. Each image's landmarks are mapped linearly so that ``[pc1, pc2]`` goes to
``standard_range = [s1, s2]``, and the standard landmarks are the mean of the mapped landmarks.

Transform: an image's own landmarks are mapped piecewise linearly onto the standard landmarks;
below the first / above the last landmark the end segments are extended (linear extrapolation);
voxels outside the mask are set to 0. Segments with coincident image landmarks (less than
``epsilon`` apart) get slope 0, as in TorchIO.

Landmark files are JSON and carry a SHA-256 fingerprint of their content (sequence, percentiles,
range, landmarks): loading refuses a file made for another sequence or edited by hand.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from medsynth.constants import canonical_sequence
from medsynth.errors import InputDataError
from medsynth.utils.hashing import json_digest
from medsynth.utils.io import save_json
from preprocessing.imageio import like_input, new_image_like, same_grid, to_nifti

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PERCENTILES",
    "LandmarkFileError",
    "NyulLandmarks",
    "NyulStandardized",
    "NyulStandardizer",
]

DEFAULT_PERCENTILES: tuple[float, ...] = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99)
_FORMAT = "medsynth-nyul-landmarks"
_VERSION = 1


class LandmarkFileError(ValueError):
    """A landmark file that cannot be used: wrong sequence(s), tampered content, bad format."""


def _as_array(item: nib.Nifti1Image | np.ndarray, what: str, index: int) -> tuple[np.ndarray, str | None]:
    if isinstance(item, nib.Nifti1Image):
        return np.asanyarray(item.dataobj), item.get_filename()
    return np.asarray(item), None


def _masked_values(
    image: nib.Nifti1Image | np.ndarray, mask: nib.Nifti1Image | np.ndarray | None, index: int = 0
) -> np.ndarray:
    """Finite intensities inside ``mask`` (``None``: the non-zero voxels, i.e. a skull-stripped image)."""
    data, path = _as_array(image, "image", index)
    if mask is None:
        region = data != 0
    else:
        if (
            isinstance(image, nib.Nifti1Image)
            and isinstance(mask, nib.Nifti1Image)
            and not same_grid(image, mask)
        ):
            raise InputDataError(f"mask grid {mask.shape} differs from image grid {image.shape}", path=path)
        region = _as_array(mask, "mask", index)[0] > 0
        if region.shape != data.shape:
            raise InputDataError(
                f"mask shape {region.shape} differs from image shape {data.shape}", path=path
            )
    values = data[region].astype(np.float64)
    if values.size == 0:
        raise InputDataError(f"image {index}: empty brain mask", path=path)
    if not np.all(np.isfinite(values)):
        raise InputDataError(f"image {index}: NaN/inf inside the brain mask", path=path)
    return values


class NyulStandardizer(Transform):
    """Nyúl & Udupa standardization model of one sequence.

    Args:
        percentiles: landmark percentiles, strictly increasing in (0, 100); the first and last are
            the cut-offs ``pc1, pc2``.
        standard_range: ``(s1, s2)``, where the cut-offs are mapped during training.
        sequence: sequence key (``t1w``, ``gd_t1w``, ``t2w``, ``flair``, ``aptw`` or an alias).
        epsilon: image landmarks closer than this give a flat segment.
    """

    def __init__(
        self,
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        standard_range: Sequence[float] = (0.0, 100.0),
        sequence: str = "t1w",
        epsilon: float = 1e-5,
    ):
        self.percentiles = np.asarray(percentiles, dtype=np.float64)
        if self.percentiles.ndim != 1 or self.percentiles.size < 2:
            raise ValueError("percentiles needs at least two values")
        if np.any(np.diff(self.percentiles) <= 0) or self.percentiles[0] < 0 or self.percentiles[-1] > 100:
            raise ValueError(
                f"percentiles must increase strictly within [0, 100], got {self.percentiles.tolist()}"
            )
        self.standard_range = tuple(float(v) for v in standard_range)
        if len(self.standard_range) != 2 or not self.standard_range[0] < self.standard_range[1]:
            raise ValueError(f"standard_range must be (low, high) with low < high, got {standard_range}")
        self.sequence = canonical_sequence(sequence)
        self.epsilon = float(epsilon)
        self.landmarks: np.ndarray | None = None
        self.n_images = 0

    # -- training -------------------------------------------------------------------------------
    def image_landmarks(self, image, mask=None) -> np.ndarray:
        """The percentile landmarks of one image inside its mask."""
        return np.percentile(_masked_values(image, mask), self.percentiles)

    def fit(
        self,
        images: Iterable[nib.Nifti1Image | np.ndarray],
        masks: Iterable[nib.Nifti1Image | np.ndarray | None] | None = None,
    ) -> NyulStandardizer:
        """Learn the standard landmarks from the training images (and their brain masks)."""
        images = list(images)
        masks = [None] * len(images) if masks is None else list(masks)
        if not images:
            raise ValueError("fit needs at least one image")
        if len(masks) != len(images):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        low, high = self.standard_range
        mapped = []
        for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
            values = np.percentile(_masked_values(image, mask, index), self.percentiles)
            span = values[-1] - values[0]
            if span <= 0:
                _, path = _as_array(image, "image", index)
                raise InputDataError(f"image {index}: constant intensities inside the mask", path=path)
            mapped.append(low + (values - values[0]) * (high - low) / span)
        self.landmarks = np.mean(mapped, axis=0)
        self.n_images = len(images)
        logger.info(
            "Nyul %s: landmarks from %d images: %s", self.sequence, self.n_images, np.round(self.landmarks, 2)
        )
        return self

    # -- mapping --------------------------------------------------------------------------------
    def _require_fitted(self) -> np.ndarray:
        if self.landmarks is None:
            raise RuntimeError(f"NyulStandardizer({self.sequence}) is not fitted; call fit() or load()")
        return self.landmarks

    def map_values(self, values: np.ndarray, image_landmarks: np.ndarray) -> np.ndarray:
        """Piecewise-linear map of ``values`` from ``image_landmarks`` to the standard landmarks."""
        standard = self._require_fitted()
        source_steps = np.diff(image_landmarks)
        flat = source_steps < self.epsilon
        slopes = np.where(flat, 0.0, np.diff(standard) / np.where(flat, 1.0, source_steps))
        intercepts = standard[:-1] - slopes * image_landmarks[:-1]
        # Inner landmarks pick the segment; values beyond the ends use the end segments.
        segment = np.digitize(values, image_landmarks[1:-1], right=False)
        return slopes[segment] * values + intercepts[segment]

    def transform(self, img: nib.Nifti1Image, mask: nib.Nifti1Image | None = None) -> nib.Nifti1Image:
        """Standardize ``img``; voxels outside ``mask`` (default: the zero voxels) become 0."""
        data = np.asanyarray(img.dataobj).astype(np.float64)
        region = data != 0 if mask is None else np.asanyarray(mask.dataobj) > 0
        landmarks = np.percentile(_masked_values(img, mask), self.percentiles)
        out = np.zeros(data.shape, dtype=np.float32)
        out[region] = self.map_values(data[region], landmarks)
        return new_image_like(out, img)

    def __call__(self, img: nib.Nifti1Image | MetaTensor, mask: nib.Nifti1Image | MetaTensor | None = None):
        """:meth:`transform` on NIfTI images or MONAI MetaTensors (the output has the input's type)."""
        return like_input(self.transform(to_nifti(img), to_nifti(mask)), img)

    # -- persistence ----------------------------------------------------------------------------
    def _payload(self) -> dict:
        return {
            "sequence": self.sequence,
            "percentiles": [float(v) for v in self.percentiles],
            "standard_range": list(self.standard_range),
            "landmarks": [float(v) for v in self._require_fitted()],
        }

    def to_dict(self) -> dict:
        payload = self._payload()
        return {**payload, "n_images": self.n_images, "fingerprint": json_digest(payload)}

    @classmethod
    def from_dict(
        cls, record: Mapping, expected_sequence: str | None = None, source: str = ""
    ) -> NyulStandardizer:
        """Rebuild a fitted model; checks the fingerprint and (optionally) the sequence."""
        keys = ("sequence", "percentiles", "standard_range", "landmarks", "fingerprint")
        missing = [k for k in keys if k not in record]
        if missing:
            raise LandmarkFileError(f"{source}: not a Nyul landmark record (missing {missing})")
        payload = {k: record[k] for k in keys[:-1]}
        if json_digest(payload) != record["fingerprint"]:
            raise LandmarkFileError(
                f"{source}: fingerprint mismatch for sequence {record['sequence']!r}: the landmarks were "
                f"modified "
                "after they were saved; refit them"
            )
        if expected_sequence is not None and canonical_sequence(expected_sequence) != record["sequence"]:
            raise LandmarkFileError(
                f"{source}: landmarks were made for sequence {record['sequence']!r}, "
                f"not {canonical_sequence(expected_sequence)!r}"
            )
        model = cls(record["percentiles"], record["standard_range"], record["sequence"])
        model.landmarks = np.asarray(record["landmarks"], dtype=np.float64)
        if model.landmarks.shape != model.percentiles.shape:
            raise LandmarkFileError(
                f"{source}: {model.landmarks.size} landmarks for {model.percentiles.size} percentiles"
            )
        model.n_images = int(record.get("n_images", 0))
        return model

    def save(self, path: str | os.PathLike) -> Path:
        """Write the landmarks as JSON (atomically)."""
        return save_json({"format": _FORMAT, "version": _VERSION, **self.to_dict()}, path)

    @classmethod
    def load(cls, path: str | os.PathLike, expected_sequence: str | None = None) -> NyulStandardizer:
        """Read a landmark file; refuses another sequence's or a tampered file."""
        record = _read_json(path)
        return cls.from_dict(record, expected_sequence, source=str(path))


def _read_json(path: str | os.PathLike) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise LandmarkFileError(f"{path}: landmark file does not exist") from err
    except json.JSONDecodeError as err:
        raise LandmarkFileError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        raise LandmarkFileError(f"{path}: not a {_FORMAT} file")
    return record


class NyulLandmarks:
    """One :class:`NyulStandardizer` per sequence, saved together in one JSON file."""

    def __init__(self, standardizers: Mapping[str, NyulStandardizer] | Iterable[NyulStandardizer] = ()):
        items = standardizers.values() if isinstance(standardizers, Mapping) else standardizers
        self.standardizers: dict[str, NyulStandardizer] = {}
        for model in items:
            if model.sequence in self.standardizers:
                raise ValueError(f"two standardizers for sequence {model.sequence!r}")
            self.standardizers[model.sequence] = model

    @property
    def sequences(self) -> tuple[str, ...]:
        return tuple(sorted(self.standardizers))

    def __getitem__(self, sequence: str) -> NyulStandardizer:
        key = canonical_sequence(sequence)
        if key not in self.standardizers:
            raise KeyError(f"no landmarks for sequence {key!r}; available: {list(self.sequences)}")
        return self.standardizers[key]

    def __contains__(self, sequence: str) -> bool:
        return canonical_sequence(sequence) in self.standardizers

    def check(self, sequences: Iterable[str], allow_extra: bool = False) -> None:
        """Raise :class:`LandmarkFileError` unless the landmarks cover exactly ``sequences``."""
        wanted = {canonical_sequence(s) for s in sequences}
        have = set(self.standardizers)
        missing, extra = sorted(wanted - have), sorted(have - wanted)
        if missing or (extra and not allow_extra):
            raise LandmarkFileError(
                f"landmarks were made for sequences {sorted(have)}, the data has {sorted(wanted)} "
                f"(missing: {missing}, unexpected: {extra})"
            )

    def save(self, path: str | os.PathLike) -> Path:
        records = {seq: model.to_dict() for seq, model in sorted(self.standardizers.items())}
        overall = json_digest({seq: r["fingerprint"] for seq, r in records.items()})
        return save_json(
            {"format": _FORMAT, "version": _VERSION, "sequences": records, "fingerprint": overall}, path
        )

    @classmethod
    def load(cls, path: str | os.PathLike, expected_sequences: Iterable[str] | None = None) -> NyulLandmarks:
        record = _read_json(path)
        if "sequences" not in record:
            raise LandmarkFileError(f"{path}: a single-sequence landmark file; use NyulStandardizer.load")
        records = record["sequences"]
        if json_digest({seq: r.get("fingerprint") for seq, r in records.items()}) != record.get(
            "fingerprint"
        ):
            raise LandmarkFileError(f"{path}: fingerprint mismatch: sequences were added, removed or edited")
        landmarks = cls(
            NyulStandardizer.from_dict(r, expected_sequence=seq, source=str(path))
            for seq, r in records.items()
        )
        if expected_sequences is not None:
            landmarks.check(expected_sequences)
        return landmarks


class NyulStandardized(MapTransform):
    """Dictionary transform: standardize each key with the landmarks of its sequence.

    Args:
        keys: image keys; each key is a sequence name unless ``sequences`` maps it.
        landmarks: a :class:`NyulLandmarks` or the path of its JSON file.
        mask_key: key of the brain mask (``None``: non-zero voxels).
        sequences: optional ``{key: sequence}`` for keys that are not sequence names.
    """

    def __init__(
        self,
        keys: KeysCollection,
        landmarks: NyulLandmarks | str | os.PathLike,
        mask_key: str | None = "brain_mask",
        sequences: Mapping[str, str] | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.landmarks = landmarks if isinstance(landmarks, NyulLandmarks) else NyulLandmarks.load(landmarks)
        self.sequences = dict(sequences or {})
        self.mask_key = mask_key
        for key in self.keys:
            sequence = self.sequences.get(key, key)
            if sequence not in self.landmarks:
                raise LandmarkFileError(
                    f"no landmarks for {key!r} (sequence {sequence!r}); have {self.landmarks.sequences}"
                )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = d.get(self.mask_key) if self.mask_key is not None else None
        for key in self.key_iterator(d):
            d[key] = self.landmarks[self.sequences.get(key, key)](d[key], mask)
        return d

"""Synthesize whole volumes slice by slice with a trained SAMR / CG-SAMR network.

The networks are 2D: each axial slice of the label map, one-hot, together with the atlas slice and
its two axial neighbours per sequence, gives one multi-sequence slice. This module prepares those
inputs exactly as the training data are prepared (same in-plane fitting, same atlas scaling, same
neighbour stacking), runs the network in batches and puts the result back on the input grid, in
intensity units.
"""

from __future__ import annotations

import copy
from typing import Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Transform
from torch import nn

from medsynth.constants import CLINICAL_SEQUENCES, NUM_LABELS
from medsynth.transforms.intensity import ScaleToUnit, unit_to_intensity, windows_for
from medsynth.transforms.slices import FitInPlane, neighbour_slices

__all__ = ["synthesize_volume", "one_hot_labels", "checked_label_volume", "random_slices", "stack_atlas"]

ATLAS_RADIUS = 1  # the slice itself and one neighbour on each side, as in training


def one_hot_labels(label_volume: np.ndarray, num_labels: int = NUM_LABELS) -> np.ndarray:
    """``(H, W, D)`` integer label map -> ``(num_labels, H, W, D)`` float32 one-hot.

    Raises:
        ValueError: NaNs, non-integer values or labels outside ``0 .. num_labels - 1``.
    """
    label = checked_label_volume(label_volume, num_labels)
    return np.moveaxis(np.eye(num_labels, dtype=np.float32)[label], -1, 0)


def checked_label_volume(label_volume: np.ndarray, num_labels: int = NUM_LABELS) -> np.ndarray:
    """The ``(H, W, D)`` label map as int64 after checking it holds only ``0 .. num_labels - 1``.

    Raises:
        ValueError: NaNs, non-integer values, unknown labels or a shape that is not a volume.
    """
    label = np.asarray(label_volume)
    if label.ndim == 4 and label.shape[0] == 1:
        label = label[0]
    if label.ndim != 3:
        raise ValueError(f"label map must be a 3D volume (H, W, D), got shape {label.shape}")
    if not np.issubdtype(label.dtype, np.integer):
        if not np.all(np.isfinite(label)):
            raise ValueError("label map contains NaN or infinite values")
        if not np.all(label == np.round(label)):
            raise ValueError("label map must hold integer values")
    label = label.astype(np.int64)
    unknown = sorted(set(np.unique(label).tolist()) - set(range(num_labels)))
    if unknown:
        raise ValueError(f"label map holds unknown label(s) {unknown}; expected 0..{num_labels - 1}")
    return label


def stack_atlas(atlas_volumes: np.ndarray | Mapping[str, np.ndarray], sequences: Sequence[str]) -> np.ndarray:
    """The atlas as one ``(N, H, W, D)`` float32 array in ``sequences`` order."""
    if isinstance(atlas_volumes, Mapping):
        missing = [s for s in sequences if s not in atlas_volumes]
        if missing:
            raise ValueError(f"atlas lacks sequence(s) {missing}; it has {sorted(atlas_volumes)}")
        stacked = np.stack([np.asarray(atlas_volumes[s], dtype=np.float32) for s in sequences])
    else:
        stacked = np.asarray(atlas_volumes, dtype=np.float32)
    if stacked.ndim != 4 or stacked.shape[0] != len(sequences):
        raise ValueError(f"atlas must be (N={len(sequences)}, H, W, D), got shape {stacked.shape}")
    if not np.all(np.isfinite(stacked)):
        raise ValueError("atlas contains NaN or infinite values")
    return stacked


def _scaled_atlas(atlas: torch.Tensor, sequences: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 2)`` windows of the atlas channels (default specs, non-zero voxels) and the scaled atlas."""
    scaler = ScaleToUnit(windows_for(sequences))
    windows = scaler.compute_windows(atlas)
    return windows, scaler(atlas, windows=windows).float()


def synthesize_volume(
    network: nn.Module,
    label_volume: np.ndarray,
    atlas_volumes: np.ndarray | Mapping[str, np.ndarray],
    sequences: Sequence[str] = CLINICAL_SEQUENCES,
    image_size: int = 256,
    windows: np.ndarray | torch.Tensor | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> dict[str, np.ndarray]:
    """Synthesize every sequence for every axial slice of a label volume.

    Args:
        network: one tensor in, one out: ``cat([mask, atlas]) (B, 5 + 3N, S, S) -> (B, N, S, S)``
            in [-1, 1] (:class:`~medsynth.networks.SynthesisInferenceNetwork`, or its TorchScript
            export). A generator returning a dict (``"images"``) is accepted as well.
        label_volume: ``(H, W, D)`` label map (0 background, 1 normal brain, 2 edema, 3 cavity, 4 tumour).
        atlas_volumes: ``(N, H, W, D)`` atlas on the same grid, or ``{sequence: (H, W, D)}``.
        sequences: the network's output sequences, in channel order.
        image_size: the in-plane size the network was trained on; every slice is padded/cropped
            (or resized when much larger) to it and the result brought back to ``(H, W)``.
        windows: ``(N, 2)`` intensity windows that map [-1, 1] back to intensities (e.g. those of
            the patient's real images). ``None`` uses the atlas' own windows.
        batch_size: slices per forward pass.
        device: where the network runs (default: where its parameters are, else CPU).

    Returns:
        ``{sequence: (H, W, D) float32}`` in intensity units, on the input grid.
    """
    label = checked_label_volume(label_volume)
    atlas = stack_atlas(atlas_volumes, sequences)
    if atlas.shape[1:] != label.shape:
        raise ValueError(f"atlas grid {atlas.shape[1:]} differs from the label map grid {label.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device) if device is not None else _device_of(network)

    # As in training (medsynth.data.dataset): fit the plane, then scale the atlas with windows taken
    # from its own non-zero voxels. The fitting depends on the grid only, so mask and atlas match.
    # Keep the fitting transform: MONAI inverts only with the instance that was applied.
    fit_atlas = FitInPlane(image_size, mode="area").transform_for(atlas.shape[1:])
    fitted_atlas = fit_atlas(MetaTensor(torch.as_tensor(atlas)))
    atlas_window, atlas_unit = _scaled_atlas(fitted_atlas.as_tensor(), sequences)
    # One-hot after fitting the plane: the fitted label map is what the network sees.
    fitted_label = FitInPlane(image_size, mode="nearest")(torch.as_tensor(label[None], dtype=torch.float32))
    fitted_mask = torch.as_tensor(one_hot_labels(torch.as_tensor(fitted_label)[0].numpy()))
    depth = label.shape[-1]

    outputs = []
    was_training = network.training
    network.eval()
    try:
        with torch.inference_mode():
            for start in range(0, depth, batch_size):
                indices = range(start, min(start + batch_size, depth))
                x = torch.stack(
                    [
                        torch.cat([fitted_mask[..., k], neighbour_slices(atlas_unit, k, ATLAS_RADIUS)])
                        for k in indices
                    ]
                ).to(device)
                prediction = network(x)
                if isinstance(prediction, Mapping):
                    prediction = prediction["images"]
                outputs.append(prediction.float().cpu())
    finally:
        network.train(was_training)
    synthesized = torch.cat(outputs).permute(1, 2, 3, 0)  # (D, N, S, S) -> (N, S, S, D)

    restored = _back_to_input_grid(synthesized, fitted_atlas, fit_atlas, label.shape)
    intensity_windows = atlas_window if windows is None else torch.as_tensor(windows, dtype=torch.float32)
    if tuple(intensity_windows.shape) != (len(sequences), 2):
        raise ValueError(f"windows must have shape ({len(sequences)}, 2), got {tuple(intensity_windows.shape)}")
    volumes = unit_to_intensity(restored, intensity_windows)
    return {sequence: volumes[c].numpy().astype(np.float32) for c, sequence in enumerate(sequences)}


def random_slices(num_slices: int, size: int, num_sequences: int, seed: int = 0) -> torch.Tensor:
    """Network inputs ``cat([one-hot mask, atlas])`` of ``num_slices`` random slices:
    (S, 5 + 3N, size, size), the mask in {0, 1}, the atlas in [-1, 1]. For benchmarks and for checking an
    optimized network against the original one."""
    generator = torch.Generator().manual_seed(seed)
    # Blocky label maps (8 x 8 pixel cells) rather than per-pixel noise; speed does not care, the check reads better.
    cells = torch.randint(0, NUM_LABELS, (num_slices, 1, size // 8, size // 8), generator=generator)
    labels = nn.functional.interpolate(cells.float(), size=(size, size), mode="nearest").long()[:, 0]
    mask = nn.functional.one_hot(labels, NUM_LABELS).permute(0, 3, 1, 2).float()
    atlas = torch.rand((num_slices, 3 * num_sequences, size, size), generator=generator) * 2 - 1
    return torch.cat([mask, atlas], dim=1)


def _back_to_input_grid(
    synthesized: torch.Tensor, fitted_like: MetaTensor, fit: Transform, spatial_shape: Sequence[int]
) -> torch.Tensor:
    """Undo the in-plane padding/cropping/resizing recorded on ``fitted_like``."""
    prediction = MetaTensor(synthesized, meta=copy.deepcopy(fitted_like.meta))
    prediction.applied_operations = copy.deepcopy(fitted_like.applied_operations)
    restored = fit.inverse(prediction)
    restored = torch.as_tensor(restored.as_tensor() if isinstance(restored, MetaTensor) else restored)
    if tuple(restored.shape[1:]) != tuple(spatial_shape):
        raise RuntimeError(f"restoring the input grid gave {tuple(restored.shape[1:])}, expected {tuple(spatial_shape)}")
    return restored


def _device_of(network: nn.Module) -> torch.device:
    for parameter in network.parameters():
        return parameter.device
    return torch.device("cpu")

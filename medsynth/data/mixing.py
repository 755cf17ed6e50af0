"""Mixing real and synthetic training instances, as the augmentation studies do.

Amounts (:func:`synthetic_count`) are given either as the SAMR / CG-SAMR papers' percentages (their
"50 % synthetic + 50 % real" is 1080 + 1080 instances, "25 % + 75 %" is 540 + 1080: the synthetic
count is ``percent / 50`` times the real count) or as Qu et al.'s multiples of the real set
(x0.2 ... x3).

:class:`MixedDataset` concatenates the real instances and the extra ones (a synthetic cohort's
slices, or classically augmented copies of real slices, :class:`AugmentedCopies`) and tags each item
with its ``source``. :class:`MixingSampler` draws, for every epoch, all real instances and the
chosen number of extra ones, in one of the modes:

* ``"random"``: shuffled together;
* ``"synthetic_first"`` / ``"real_first"``: the same draws over the whole run, reordered so that
  every step of one source comes before any of the other (pre-training, then fine-tuning); each
  source gets iteration steps in proportion to its amount.

The sampler follows ``DistributedSampler``'s protocol (``set_epoch``, zero-based; MONAI's workflows
call it only for a ``DistributedSampler``, so the bundle attaches
:class:`medsynth.engines.SamplerEpochSetter`) and
shards like it under DDP (``num_replicas``, ``rank``): every process takes every ``num_replicas``-th
index of the same global order, so the ranks together draw the single-process run's instances, in
its order, step by step.

The confidence-weighted arm (``confidence_weighted``) gives every item a voxel ``"weight"``: 1 for
real instances and, for synthetic ones, CG-SAMR's confidence averaged over the sequences
(:func:`confidence_weight`); :class:`medsynth.losses.VoxelWeightedDiceCELoss` takes it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, Rand2DElasticd, RandFlipd, RandRotated, RandZoomd
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset, Sampler

from medsynth.utils.errors import reports_input_problems

__all__ = [
    "MIXING_MODES",
    "AugmentedCopies",
    "MixedDataset",
    "MixingSampler",
    "RealShare",
    "classic_augmentation",
    "confidence_weight",
    "synthetic_count",
    "training_mixture",
]

MIXING_MODES: tuple[str, ...] = ("random", "synthetic_first", "real_first")


def synthetic_count(real_count: int, percent: float | None = None, multiple: float | None = None) -> int:
    """Extra instances for ``real_count`` real ones: ``percent`` as in the SAMR / CG-SAMR tables
    (50 -> as many as the real ones, 25 -> half as many), or ``multiple`` of the real count (Qu)."""
    if (percent is None) == (multiple is None):
        raise ValueError("give exactly one of percent (the papers' tables) or multiple (Qu et al.)")
    factor = float(percent) / 50.0 if percent is not None else float(multiple)
    if factor < 0:
        raise ValueError(f"the synthetic amount must not be negative, got {percent or multiple}")
    return int(round(real_count * factor))


def classic_augmentation(seed: int = 0, keys: Sequence[str] = ("image", "label")) -> Compose:
    """The classic-augmentation arm's random transforms on a 2D instance (MONAI): flips, rotations,
    scaling and elastic deformation, the label map by nearest neighbour."""
    modes = ["bilinear", "nearest"]
    transform = Compose(
        [
            RandFlipd(list(keys), prob=0.5, spatial_axis=0),
            RandFlipd(list(keys), prob=0.5, spatial_axis=1),
            RandRotated(list(keys), range_x=np.pi / 12, prob=0.5, mode=modes, padding_mode="border"),
            RandZoomd(list(keys), min_zoom=0.9, max_zoom=1.1, prob=0.5, mode=["bilinear", "nearest-exact"]),
            Rand2DElasticd(
                list(keys),
                spacing=(16, 16),
                magnitude_range=(0.5, 1.5),
                prob=0.3,
                mode=modes,
                padding_mode="border",
            ),
        ]
    )
    transform.set_random_state(seed)
    return transform


class RealShare(Dataset):
    """A seeded share of the real instances, Qu et al.'s arms with less real data (0.1R ... 0.8R, or
    none): ``round(fraction * len(dataset))`` items drawn once without replacement, in index order.

    Args:
        dataset: the real instances.
        fraction: the share kept, 0..1.
        seed: seed of the draw.
    """

    def __init__(self, dataset: Dataset, fraction: float, seed: int = 0) -> None:
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"real_fraction must be in 0..1, got {fraction}")
        count = int(round(float(fraction) * len(dataset)))
        self.indices = np.sort(np.random.default_rng([int(seed), 1]).permutation(len(dataset))[:count])
        self.dataset, self.fraction = dataset, float(fraction)
        self.sequences = getattr(dataset, "sequences", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.dataset[int(self.indices[index])]


class AugmentedCopies(Dataset):
    """``count`` classically augmented copies of the items of ``dataset`` (copy ``i`` is item
    ``i % len(dataset)``), each drawn from a generator seeded by ``(seed, i)``: the same copy for the
    same index, whatever the order of access.

    Args:
        dataset: the real instances (dicts with ``image`` and ``label``).
        count: number of copies.
        seed: seed of the draws.
    """

    def __init__(self, dataset: Dataset, count: int, seed: int = 0) -> None:
        self.dataset, self.count, self.seed = dataset, int(count), int(seed)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index % len(self.dataset)])
        seed = int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0])
        out = classic_augmentation(seed)({"image": item["image"], "label": item["label"].float()})
        # Plain tensors, like the real items: a batch mixing MetaTensors and tensors does not collate.
        item["image"] = convert_to_tensor(out["image"], track_meta=False).float()
        item["label"] = convert_to_tensor(out["label"], track_meta=False).round().long()
        return item


def confidence_weight(confidence: torch.Tensor) -> torch.Tensor:
    """Voxel loss weight ``(1, H, W)`` of a synthetic instance from its per-sequence confidence maps
    ``(N, H, W)`` in (0, 1): their mean, so a voxel counts as much as the model trusts it on average."""
    return confidence.float().mean(dim=0, keepdim=True)


class MixedDataset(Dataset):
    """The real instances followed by the extra ones; every item gets ``"source"`` (``"real"`` or
    ``extra_name``) and only the keys both share (so batches collate).

    Args:
        real: the real training instances.
        extra: the synthetic (or augmented) instances.
        extra_name: the source name of ``extra``'s items.
        keys: the keys an item keeps (default: ``image``, ``label``, ``patient_id``).
        confidence_weighted: every item also gets ``"weight"`` ``(1, H, W)``: ones for real items,
            :func:`confidence_weight` of the ``"confidence"`` of extra items (which must carry it).
    """

    def __init__(
        self,
        real: Dataset,
        extra: Dataset | None,
        extra_name: str = "synthetic",
        keys: Sequence[str] = ("image", "label", "patient_id"),
        confidence_weighted: bool = False,
    ) -> None:
        self.real, self.extra, self.extra_name, self.keys = real, extra, extra_name, tuple(keys)
        self.confidence_weighted = bool(confidence_weighted)

    @property
    def real_size(self) -> int:
        return len(self.real)

    @property
    def extra_size(self) -> int:
        return 0 if self.extra is None else len(self.extra)

    def __len__(self) -> int:
        return self.real_size + self.extra_size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < self.real_size:
            item, source = self.real[index], "real"
        else:
            item, source = self.extra[index - self.real_size], self.extra_name
        out = {**{k: item[k] for k in self.keys if k in item}, "source": source}
        if self.confidence_weighted:
            if source == "real":
                out["weight"] = torch.ones_like(item["label"], dtype=torch.float32)
            elif "confidence" in item:
                out["weight"] = confidence_weight(item["confidence"])
            else:
                raise ValueError(
                    f"{source} instance {index - self.real_size} has no confidence map to weight by"
                )
        return out


class MixingSampler(Sampler[int]):
    """Indices into a :class:`MixedDataset`: every epoch all real instances and ``extra_count`` extra
    ones (drawn without replacement while the pool lasts), in ``mode`` (see the module docstring).

    Args:
        dataset: the mixed dataset.
        extra_count: extra instances per epoch (:func:`synthetic_count`).
        mode: one of :data:`MIXING_MODES`.
        num_epochs: the run's length (the ordered modes order the whole run).
        seed: seed of the draws and the shuffles.
        num_replicas: DDP processes sharing the epoch (1 without DDP).
        rank: this process's rank among them.
    """

    def __init__(
        self,
        dataset: MixedDataset,
        extra_count: int,
        mode: str = "random",
        num_epochs: int = 1,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if mode not in MIXING_MODES:
            raise ValueError(f"unknown mixing mode {mode!r}; choose one of {MIXING_MODES}")
        if extra_count > 0 and dataset.extra_size == 0:
            raise ValueError(f"{extra_count} extra instances asked for, but the extra source is empty")
        self.real_size, self.extra_size = dataset.real_size, dataset.extra_size
        self.extra_count, self.mode = int(extra_count), mode
        self.num_epochs, self.seed = max(int(num_epochs), 1), int(seed)
        if not 0 <= int(rank) < int(num_replicas):
            raise ValueError(f"rank {rank} is not among {num_replicas} replica(s)")
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.epoch = 0
        self._run_order: np.ndarray | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def epoch_size(self) -> int:
        """Instances per epoch over all processes."""
        return self.real_size + self.extra_count

    def __len__(self) -> int:
        return -(-self.epoch_size // self.num_replicas)

    def _epoch_draw(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s indices, shuffled together (the random mode's order)."""
        rng = np.random.default_rng([self.seed, epoch])
        extra = np.concatenate(
            [rng.permutation(self.extra_size) for _ in range(-(-self.extra_count // max(self.extra_size, 1)))]
            or [np.empty(0, dtype=np.int64)]
        )[: self.extra_count]
        indices = np.concatenate([np.arange(self.real_size), self.real_size + extra]).astype(np.int64)
        return rng.permutation(indices)

    def run_order(self) -> np.ndarray:
        """The whole run's indices (``num_epochs`` x ``epoch_size``, all processes), in the mode's order
        (computed once)."""
        if self._run_order is None:
            self._run_order = self._ordered_run()
        return self._run_order

    def _ordered_run(self) -> np.ndarray:
        stream = np.concatenate([self._epoch_draw(e) for e in range(self.num_epochs)])
        if self.mode == "random":
            return stream
        extra_first = self.mode == "synthetic_first"
        is_extra = stream >= self.real_size
        first, second = (
            (stream[is_extra], stream[~is_extra]) if extra_first else (stream[~is_extra], stream[is_extra])
        )
        return np.concatenate([first, second])

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s indices over all processes, in order."""
        epoch %= self.num_epochs
        if self.mode == "random":
            return self._epoch_draw(epoch)
        start = epoch * self.epoch_size
        return self.run_order()[start : start + self.epoch_size]

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices(self.epoch)
        if self.num_replicas > 1:  # pad by wrapping, as DistributedSampler does, so every rank steps alike
            indices = np.resize(indices, len(self) * self.num_replicas)[self.rank :: self.num_replicas]
        return iter(indices.tolist())


@reports_input_problems
def training_mixture(
    real: Dataset,
    synthetic_dir: str = "",
    percent: float | None = None,
    multiple: float | None = None,
    classic: bool = False,
    mode: str = "random",
    num_epochs: int = 1,
    seed: int = 0,
    image_size: int = 128,
    cache_dir: str = "runs/cache",
    slice_selection: str = "brain",
    real_dataset_dir: str = "",
    confidence_weighted: bool = False,
    num_replicas: int = 1,
    rank: int = 0,
    real_fraction: float = 1.0,
) -> dict[str, Any]:
    """The lesion-segmentation bundle's training data: ``{"dataset", "sampler", "extra_count"}``.

    Without ``synthetic_dir`` and ``classic`` (or without an amount) the real instances alone, shuffled.
    With ``synthetic_dir`` (a ``medsynth augment`` cohort, its ``train`` split) or ``classic`` (augmented
    copies of the real instances), the amount (``percent`` or ``multiple``, :func:`synthetic_count`) of
    extra instances per epoch is mixed in by ``mode``. A synthetic cohort must hold the real instances'
    sequences, and its preprocessing fingerprint (where known) must be the real cohort's
    (``real_dataset_dir``). ``confidence_weighted`` weights the synthetic voxels by the cohort's
    confidence maps (the items get ``"weight"``); ``num_replicas`` and ``rank`` shard the sampler
    under DDP. ``real_fraction`` < 1 keeps a seeded share of the real instances (:class:`RealShare`);
    the extra amount stays a multiple of the *whole* real set, as Qu et al.'s Table 2 counts it.
    """
    from medsynth.utils.bundles import as_flag

    classic = as_flag(classic, "classic_augmentation")
    confidence_weighted = as_flag(confidence_weighted, "confidence_weighting")
    if synthetic_dir and classic:
        raise ValueError("choose synthetic_dir or classic augmentation for the extra instances, not both")
    if confidence_weighted and not synthetic_dir:
        raise ValueError("confidence weighting needs a synthetic cohort (synthetic_dir) with confidence maps")
    if confidence_weighted and percent is None and multiple is None:
        raise ValueError(
            "confidence weighting needs synthetic instances: give synthetic_percent or synthetic_multiple"
        )
    extra_count = 0
    if (synthetic_dir or classic) and (percent is not None or multiple is not None):
        extra_count = synthetic_count(len(real), percent, multiple)
    extra: Dataset | None = None
    name = "synthetic"
    if synthetic_dir and extra_count:
        from medsynth.data.cohort import preprocessing_fingerprint, require_same_preprocessing, resolve_cohort
        from medsynth.data.dataset import make_slice_dataset

        require_same_preprocessing(
            {
                real_dataset_dir or "the real cohort": preprocessing_fingerprint(real_dataset_dir),
                synthetic_dir: preprocessing_fingerprint(synthetic_dir),
            }
        )
        manifest = resolve_cohort(synthetic_dir, cache_dir, build_atlas=False)
        # The mixture keeps image and label only: a cohort without atlas (cases from noise) mixes too.
        extra = make_slice_dataset(
            manifest,
            "train",
            image_size,
            slice_selection,
            with_confidence=confidence_weighted,
            with_atlas=False,
        )
        real_sequences = getattr(real, "sequences", None)
        if real_sequences is not None and tuple(extra.sequences) != tuple(real_sequences):
            raise ValueError(
                f"the synthetic cohort {synthetic_dir} has sequences {list(extra.sequences)}, the real "
                f"instances {list(real_sequences)}: they cannot be mixed"
            )
    elif classic and extra_count:
        extra, name = AugmentedCopies(real, extra_count, seed), "classic_augmentation"
    if not 0.0 <= float(real_fraction) <= 1.0:
        raise ValueError(f"real_fraction must be in 0..1, got {real_fraction}")
    if float(real_fraction) < 1.0:
        real = RealShare(real, real_fraction, seed)
    if len(real) == 0 and extra_count == 0:
        raise ValueError("no training instance: real_fraction 0 needs synthetic or augmented instances")
    dataset = MixedDataset(real, extra, name, confidence_weighted=confidence_weighted)
    sampler = MixingSampler(dataset, extra_count, mode, num_epochs, seed, num_replicas, rank)
    return {"dataset": dataset, "sampler": sampler, "extra_count": extra_count}

"""Unpaired training data (UCG-SAMR, CycleGAN-like methods): lesion masks with their anatomic prior
(domain 1) and multi-sequence images (domain 2), drawn independently.

:class:`UnpairedSliceDataset` wraps a :class:`~medsynth.data.dataset.SliceDataset`: item ``i`` is
the domain-1 part (``mask``, ``tissue``, ``atlas``, ``label``) of the ``i``-th domain-1 slice and the
domain-2 part (``image``, ``window``) of a slice drawn for it from ``(seed, epoch)``. With
``disjoint_patients`` the training patients are split (seeded) into a mask half and an image half,
so that no mask ever meets its own images: there is no pair at all. :meth:`set_epoch` redraws the
partners (``medsynth.engines.SamplerEpochSetter`` calls it at every epoch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["DOMAIN1_KEYS", "DOMAIN2_KEYS", "UnpairedSliceDataset"]

DOMAIN1_KEYS: tuple[str, ...] = ("mask", "tissue", "atlas", "label", "brain_mask")
DOMAIN2_KEYS: tuple[str, ...] = ("image", "window")


class UnpairedSliceDataset(torch.utils.data.Dataset):
    """Domain-1 and domain-2 halves of slices, drawn independently (see the module docstring).

    Args:
        slices: a slice dataset made ``with_tissue`` (the prior), e.g. the training split's.
        seed: seeds the patient split and the partners.
        disjoint_patients: the masks and the images come from disjoint patient halves.

    Raises:
        ValueError: fewer than two patients with ``disjoint_patients``.
    """

    def __init__(self, slices: Any, seed: int = 0, disjoint_patients: bool = True) -> None:
        self.slices, self.seed, self.disjoint_patients = slices, int(seed), bool(disjoint_patients)
        patients = sorted(set(slices.patient_ids))
        if disjoint_patients:
            if len(patients) < 2:
                raise ValueError(
                    f"disjoint unpaired domains need at least 2 training patients, got {len(patients)}"
                )
            order = np.random.default_rng([self.seed, 0]).permutation(len(patients))
            half = len(patients) // 2
            self.mask_patients = sorted(patients[i] for i in order[half:])
            self.image_patients = sorted(patients[i] for i in order[:half])
        else:
            self.mask_patients = self.image_patients = patients
        owner = [slices.patient_ids[p] for p, _ in slices.slices]
        self.domain1 = [i for i, pid in enumerate(owner) if pid in set(self.mask_patients)]
        self.domain2 = [i for i, pid in enumerate(owner) if pid in set(self.image_patients)]
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw every domain-1 slice's domain-2 partner for ``epoch``."""
        self.epoch = int(epoch)
        rng = np.random.default_rng([self.seed, 1, self.epoch])
        self.partners = rng.integers(len(self.domain2), size=len(self.domain1))

    def __len__(self) -> int:
        return len(self.domain1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        first = self.slices[self.domain1[index]]
        second = self.slices[self.domain2[int(self.partners[index])]]
        item = {key: first[key] for key in DOMAIN1_KEYS if key in first}
        item.update({key: second[key] for key in DOMAIN2_KEYS})
        item["mask_patient"], item["image_patient"] = first["patient_id"], second["patient_id"]
        item["mask_slice"], item["image_slice"] = first["slice_index"], second["slice_index"]
        return item

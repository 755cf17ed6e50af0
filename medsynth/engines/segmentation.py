"""Lesion-segmentation evaluation on MONAI's ``SupervisedEvaluator``: per patient, on the stacked slices.

The lesion-segmentation bundle trains a 2D U-Net on slices (MONAI ``SupervisedTrainer``) and scores
it per patient: MONAI's ``SliceInferer`` runs the 2D network over each patient's volume, and
:class:`LesionSegmentationMetric` accumulates :class:`medsynth.metrics.SegmentationMetrics` (Dice,
HD95, sensitivity, specificity per lesion class) over the patients. The papers report per-instance
(per-slice) figures; a per-patient Dice weighs every voxel of a patient's lesion once, so small
lesion slices do not dominate, and HD95 is a 3D distance (in voxels of the network's grid).

Training batches go through :class:`PrepareBatchWithWeights`, which hands the confidence-weighted
arm's voxel weights to :class:`medsynth.losses.VoxelWeightedDiceCELoss`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.engines.utils import PrepareBatch

from medsynth.engines.handlers import MetricsTableWriter
from medsynth.utils.io import save_json

logger = logging.getLogger(__name__)

__all__ = [
    "LesionSegmentationMetric",
    "PrepareBatchWithWeights",
    "SegmentationTableWriter",
    "segmentation_summary",
]


class PrepareBatchWithWeights(PrepareBatch):
    """``(image, label)`` of a training batch; where the batch has ``weight_key`` (the
    confidence-weighted arm), the label gets the weights as a second channel (``SupervisedTrainer``
    gives the loss only the prediction and this target).

    Args:
        weight_key: batch key of the voxel weights ``(B, 1, H, W)``.
    """

    def __init__(self, weight_key: str = "weight") -> None:
        self.weight_key = weight_key

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = batchdata["image"], batchdata["label"]
        if self.weight_key in batchdata:
            label = torch.cat([label.float(), batchdata[self.weight_key].float()], dim=1)
        return (
            image.to(device=device, non_blocking=non_blocking, **kwargs),
            label.to(device=device, non_blocking=non_blocking, **kwargs),
        )


def _segmentation_output(output: Mapping[str, Any]) -> tuple:
    return output["pred"], output["label"]


def segmentation_summary(table: Any) -> dict[str, float]:
    """Flat numbers of a segmentation table (:meth:`SegmentationMetrics.aggregate`): every cell as
    ``<class>/<column>`` and ``mean_dice`` (the mean Dice over the classes present)."""
    summary = {
        f"{name}/{column}": float(table.loc[name, column])
        for name in table.index
        for column in ("Dice", "HD95", "Sensitivity", "Specificity")
    }
    dice = table["Dice"].to_numpy(dtype=float)
    summary["mean_dice"] = float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan")
    return summary


class LesionSegmentationMetric(Metric):
    """Ignite metric over :class:`medsynth.metrics.SegmentationMetrics`, one case per patient.

    ``compute()`` returns the mean Dice over the lesion classes (an evaluator's key metric); the
    table is left in ``engine.state.metric_details[name]`` and the per-case rows (with the patient
    ids) in ``engine.state.metric_details[name + "_cases"]``.

    Args:
        classes: class name -> label value(s) (default: edema, cavity, tumour).
        output_transform: ``engine.state.output`` -> ``(pred, label)``: ``pred`` logits ``(B, C, ...)``
            or a label map ``(B, 1, ...)``, ``label`` ``(B, 1, ...)``. The patient ids come from the
            batch's ``patient_id`` (MONAI's evaluator output does not carry them).
    """

    def __init__(
        self,
        classes: Mapping[str, int | Sequence[int]] | None = None,
        output_transform: Callable = _segmentation_output,
    ) -> None:
        self.classes = classes
        self.table = None
        self.cases = None
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        from medsynth.metrics import SegmentationMetrics

        self._metrics = SegmentationMetrics(self.classes)
        self._patients: list[str] = []

    def iteration_completed(self, engine: Engine) -> None:
        batch = engine.state.batch
        patients = batch.get("patient_id") if isinstance(batch, Mapping) else None
        pred, label = self._output_transform(engine.state.output)
        self._metrics.update(pred, label)
        count = int(label.shape[0])
        self._patients += [str(p) for p in patients] if patients is not None else [""] * count

    def update(self, output: Sequence[Any]) -> None:
        pred, label = output
        self._metrics.update(pred, label)
        self._patients += [""] * int(label.shape[0])

    def compute(self) -> float:
        self.table = self._metrics.aggregate()
        cases = self._metrics.per_case()  # under DDP MONAI's metrics gather every rank's cases, in rank order
        patients = self._patients
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, patients)
            patients = [p for part in gathered for p in part]
            if len(set(patients)) < len(patients):
                logger.warning("a distributed sampler padded the evaluation: some patients are counted twice")
        cases["patient_id"] = [patients[i] for i in cases["case"]]
        self.cases = cases
        return segmentation_summary(self.table)["mean_dice"]

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        if getattr(engine.state, "metric_details", None) is None:
            engine.state.metric_details = {}
        engine.state.metric_details[name] = self.table
        engine.state.metric_details[f"{name}_cases"] = self.cases


class SegmentationTableWriter(MetricsTableWriter):
    """After each evaluation write the segmentation table (CSV + Markdown), its per-patient rows and a
    ``metrics.json`` with the flat numbers (attach to the evaluator); the table and rows are written
    as :class:`~medsynth.engines.handlers.MetricsTableWriter` writes Table I.

    Args:
        output_dir: folder of the tables.
        metric_name: name under which :class:`LesionSegmentationMetric` is attached.
        table_name: file stem.
        global_epoch_fn: the epoch recorded (default: the engine's).
        extra: further entries of ``metrics.json``.
    """

    def __init__(
        self,
        output_dir: str,
        metric_name: str = "mean_dice",
        table_name: str = "segmentation",
        global_epoch_fn: Callable[[Engine], int] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(output_dir, [], metric_name, table_name, global_epoch_fn, extra)

    def __call__(self, engine: Engine) -> None:
        table, cases, epoch = self.write_table_and_cases(engine)
        summary = segmentation_summary(table)
        patients = int(cases["patient_id"].nunique()) if cases is not None else None
        save_json(
            {
                "epoch": epoch,
                "patients": patients,
                "hd95_unit": table.attrs.get("hd95_unit"),
                **self.extra,
                **summary,
            },
            self.output_dir / "metrics.json",
        )
        logger.info(
            "epoch %d: mean Dice %.4f over %s patient(s) (%s; tables in %s)",
            epoch,
            summary["mean_dice"],
            patients,
            ", ".join(f"{name} {table.loc[name, 'Dice']:.3f}" for name in table.index),
            self.output_dir,
        )

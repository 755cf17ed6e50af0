"""Ignite handlers of the synthesis workflows: resume, periodic validation, best model, sample grids, tables.

They follow MONAI's handler pattern: a constructor with plain, config-friendly arguments and an
``attach(engine)`` method, so a bundle config lists them under ``handlers``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.handlers import CheckpointLoader, ValidationHandler
from monai.networks.utils import eval_mode
from torch.utils.data import default_collate

from medsynth.constants import LESION_LABELS, SEQUENCE_TITLES
from medsynth.engines.adversarial import unwrap
from medsynth.engines.utils import GENERATOR_CALL, TRAINING_BATCH
from medsynth.utils.bundles import as_flag
from medsynth.utils.io import atomic_path, save_json

logger = logging.getLogger(__name__)

_CHECKPOINT_EPOCH = re.compile(r"epoch=(\d+)\.pt$")


def _epochs_and_checkpoints(save_dir: str | os.PathLike, prefix: str) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of the ``*<prefix>_epoch=<n>.pt`` files in ``save_dir``, newest epoch first."""
    folder = Path(save_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob(f"*{prefix}*epoch=*.pt"):
        match = _CHECKPOINT_EPOCH.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def checkpoints_by_epoch(save_dir: str | os.PathLike, prefix: str = "checkpoint") -> list[Path]:
    """The ``*<prefix>_epoch=<n>.pt`` files in ``save_dir`` (as written by
    :class:`monai.handlers.CheckpointSaver` with ``save_interval``), newest epoch first."""
    return [path for _, path in _epochs_and_checkpoints(save_dir, prefix)]


def latest_checkpoint(save_dir: str | os.PathLike, prefix: str = "checkpoint") -> str:
    """Path of the highest-epoch checkpoint in ``save_dir``, or ``""`` when there is none."""
    found = checkpoints_by_epoch(save_dir, prefix)
    return str(found[0]) if found else ""


class ResumeCheckpointLoader:
    """Resume a run from the latest interval checkpoint in ``save_dir``, if there is one.

    Delegates the loading to :class:`monai.handlers.CheckpointLoader` (engine state, networks,
    optimizers, schedulers, loss state), so re-running the same training command after an
    interruption continues where the last completed epoch left off. MONAI's saver does not write
    atomically, so a checkpoint that cannot be read (a job killed while saving) is skipped in
    favour of the previous one (keep ``n_saved >= 2``).

    Args:
        save_dir: folder of the interval checkpoints.
        load_dict: objects to restore, keyed as in the saver's ``save_dict``.
        enabled: ``False`` always starts from scratch.
        prefix: file prefix of the checkpoints.
        map_location: passed to ``torch.load`` (e.g. ``"cpu"``).
    """

    def __init__(
        self,
        save_dir: str,
        load_dict: Mapping[str, Any],
        enabled: bool = True,
        prefix: str = "checkpoint",
        map_location: Any = None,
    ) -> None:
        self.save_dir = save_dir
        self.load_dict = dict(load_dict)
        self.enabled = as_flag(enabled, "resume")
        self.prefix = prefix
        self.map_location = map_location
        self.loaded_path = ""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.enabled:
            return
        for path in checkpoints_by_epoch(self.save_dir, self.prefix):
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # a truncated file: fall back to the previous epoch
                logger.warning("skipping unreadable checkpoint %s (%s)", path, error)
                continue
            logger.info("resuming from %s", path)
            CheckpointLoader(load_path=str(path), load_dict=self.load_dict, map_location=self.map_location)(
                engine
            )
            self.loaded_path = str(path)
            return


class ModelAtlasSaver:
    """At the start of training, save the training split's atlas beside the weights
    (:func:`medsynth.data.atlas.save_model_atlas`): evaluation and inference use it on other cohorts.

    Args:
        manifest: the training cohort.
        save_dir: the model folder (``<output_dir>/models``).
    """

    def __init__(self, manifest: Any, save_dir: str) -> None:
        self.manifest = manifest
        self.save_dir = save_dir
        self.record: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        from medsynth.data.atlas import save_model_atlas

        self.record = save_model_atlas(self.manifest, self.save_dir)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class SamplerEpochSetter:
    """Tell a sampler which epoch starts (``sampler.set_epoch(epoch - 1)``, zero-based), so that it
    draws and orders that epoch's instances. MONAI's workflows do this only for a
    ``DistributedSampler``; :class:`medsynth.data.mixing.MixingSampler` needs it on every process
    (without it every epoch repeats the first: an ordered mode never leaves its first source). A
    resumed run gets the epoch it resumes at.

    Args:
        sampler: anything with ``set_epoch(int)``.
    """

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.sampler.set_epoch(engine.state.epoch - 1)


class TrainingTimeEstimate:
    """Say how long training will take before the time is spent.

    At the start: the iterations per epoch and the epochs left. After ``measure`` iterations of the
    run (the first ``warmup`` ones, which build caches and allocate memory, not counted): the time
    per epoch at that rate and for the remaining epochs, e.g. "epoch = 181 iterations, about 14 min
    at the current rate; 16 epochs about 3.7 h". Validation and checkpoints come on top.

    Args:
        warmup: first iterations not timed.
        measure: iterations timed.
    """

    def __init__(self, warmup: int = 1, measure: int = 5) -> None:
        if warmup < 0 or measure < 1:
            raise ValueError(f"need warmup >= 0 and measure >= 1, got {warmup}, {measure}")
        self.warmup = warmup
        self.measure = measure
        self.seconds_per_iteration: float | None = None
        self._seen = 0
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)

    def _epochs_left(self, engine: Engine) -> int:
        return int(engine.state.max_epochs) - int(engine.state.epoch)

    def started(self, engine: Engine) -> None:
        self._seen = 0
        self.seconds_per_iteration = None
        self._start = time.perf_counter()
        logger.info(
            "training: epoch = %s iterations, %d epoch(s) to go (time estimate after %d iterations)",
            engine.state.epoch_length,
            self._epochs_left(engine),
            self.warmup + self.measure,
        )

    def iteration_completed(self, engine: Engine) -> None:
        self._seen += 1
        if self._seen == self.warmup:
            self._start = time.perf_counter()
        if self._seen != self.warmup + self.measure:
            return
        self.seconds_per_iteration = (time.perf_counter() - self._start) / self.measure
        epoch_seconds = self.seconds_per_iteration * int(engine.state.epoch_length or 0)
        left = self._epochs_left(engine) + 1  # the current epoch included
        logger.info(
            "training: epoch = %s iterations, about %s at the current rate (%.2f s per iteration); "
            "%d epoch(s) about %s, validation and checkpoints not counted",
            engine.state.epoch_length,
            _duration(epoch_seconds),
            self.seconds_per_iteration,
            left,
            _duration(epoch_seconds * left),
        )


class CheckpointPruner:
    """Keep only the ``keep`` newest interval checkpoints of the current run in ``save_dir``.

    :class:`monai.handlers.CheckpointSaver` (``n_saved``) only forgets the files it wrote itself, so
    after a resume the previous process' checkpoints stayed forever (each holds three networks and
    their optimizers). Attached after the saver, this handler deletes, after every epoch, the
    checkpoints older than the ``keep`` newest and those of a later epoch than the current one
    (left by a run that was started over with ``resume=False``, or unreadable leftovers of a kill:
    a readable later checkpoint would have been resumed from).

    Args:
        save_dir: folder of the interval checkpoints.
        keep: how many to keep (at least 2, so that a kill while saving leaves a readable one).
        prefix: file prefix of the checkpoints.
    """

    def __init__(self, save_dir: str, keep: int = 2, prefix: str = "checkpoint") -> None:
        if keep < 2:
            raise ValueError(
                f"keep at least 2 checkpoints (a kill while saving leaves one unreadable), got {keep}"
            )
        self.save_dir = save_dir
        self.keep = keep
        self.prefix = prefix

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        current = engine.state.epoch
        kept = 0
        for epoch, path in _epochs_and_checkpoints(self.save_dir, self.prefix):
            if epoch <= current and kept < self.keep:
                kept += 1
                continue
            path.unlink(missing_ok=True)
            logger.info("removed %s checkpoint %s", "stale" if epoch > current else "old", path)


def _every_or_last(interval: int) -> Callable[[Engine, int], bool]:
    def event_filter(engine: Engine, epoch: int) -> bool:
        return epoch % interval == 0 or epoch == engine.state.max_epochs

    return event_filter


class PeriodicValidationHandler(ValidationHandler):
    """:class:`monai.handlers.ValidationHandler` that also validates after the last epoch, so a
    run whose length is not a multiple of ``interval`` still ends with a validated model."""

    def attach(self, engine: Engine) -> None:
        if self.interval < 1:
            raise ValueError(f"validation interval must be at least 1, got {self.interval}")
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=_every_or_last(self.interval)), self)
        if self.exec_at_start:
            engine.add_event_handler(Events.STARTED, self)


class BestModelSaver:
    """Save ``network``'s weights when an evaluator's metric improves (attach to the evaluator).

    Unlike a key-metric :class:`~monai.handlers.CheckpointSaver`, it is checkpointable
    (``state_dict``/``load_state_dict``): put it in the trainer's checkpoint so that a resumed run
    compares against the best score of the interrupted one.

    Args:
        save_dir: output folder.
        network: module whose ``state_dict`` is saved (e.g. the inference network).
        metric_name: key in ``engine.state.metrics``.
        filename: name of the weights file.
        greater_is_better: direction of the metric.
        companions: further networks saved with it at the same epoch, file name -> module (e.g. the
            jointly trained U-Net as ``segmenter.pt``, the segmentation gate of synthetic cohorts).
    """

    def __init__(
        self,
        save_dir: str,
        network: torch.nn.Module,
        metric_name: str = "mean_ssim",
        filename: str = "model.pt",
        greater_is_better: bool = True,
        companions: Mapping[str, torch.nn.Module] | None = None,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.network = network
        self.companions = dict(companions or {})
        self.metric_name = metric_name
        self.filename = filename
        self.greater_is_better = greater_is_better
        self.best_metric = -math.inf if greater_is_better else math.inf
        self.best_epoch = -1

    @property
    def path(self) -> Path:
        return self.save_dir / self.filename

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        value = float(engine.state.metrics[self.metric_name])
        better = value > self.best_metric if self.greater_is_better else value < self.best_metric
        if not (better and math.isfinite(value)):
            return
        self.best_metric, self.best_epoch = value, int(engine.state.epoch)
        for filename, network in self.companions.items():  # first, so the model file means all are there
            with atomic_path(self.save_dir / filename) as tmp:
                torch.save(unwrap(network).state_dict(), tmp)
        with atomic_path(self.path) as tmp:
            torch.save(unwrap(self.network).state_dict(), tmp)
        save_json(
            {"metric": self.metric_name, "value": value, "epoch": self.best_epoch},
            self.save_dir / (Path(self.filename).stem + "_best_metric.json"),
        )
        logger.info(
            "new best %s %.4f at epoch %d: saved %s", self.metric_name, value, self.best_epoch, self.path
        )

    def state_dict(self) -> dict:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_metric = float(state["best_metric"])
        self.best_epoch = int(state["best_epoch"])


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


class SampleGridHandler:
    """Every ``interval`` epochs (and after the last one) draw a PNG per sample: one row per sequence,
    columns mask | real | synthesized | confidence (the last for CG-SAMR only).

    The samples are lesion slices: the slice with the largest lesion area of the dataset, then
    slices drawn at random (seeded) among the other lesion slices; slices without lesion only when
    the dataset has too few with one. They are chosen once, so the grids of successive epochs show
    the same slices and the progress of the model is easy to follow.

    Args:
        generator: the synthesis generator (returns a dict with ``"images"``).
        dataset: items with ``mask``, ``atlas``, ``image`` and ``label``; when it has a ``slice_table``
            with ``lesion_fraction`` (:class:`medsynth.data.dataset.SliceDataset`) the lesion areas
            are read from it, else from the items' label maps.
        output_dir: PNG folder.
        sequences: sequence keys in channel order (row titles).
        interval: epochs between grids.
        num_samples: number of dataset items drawn.
        device: where the generator runs.
        generator_call: feeds the generator from the collated items (default ``generator(mask, atlas)``).
        seed: seed of the random lesion slices.
        tag: names the grids ``<tag>_sample_<n>.png`` (title ``<tag>: ...``) instead of by epoch, for
            an evaluation, whose engine epoch is not the model's (e.g. ``"test_split"``).
    """

    def __init__(
        self,
        generator: torch.nn.Module,
        dataset: Sequence[Mapping[str, Any]],
        output_dir: str,
        sequences: Sequence[str],
        interval: int = 1,
        num_samples: int = 2,
        device: str | torch.device = "cpu",
        generator_call: Callable = GENERATOR_CALL,
        seed: int = 0,
        tag: str | None = None,
    ) -> None:
        if interval < 1:
            raise ValueError(f"sample interval must be at least 1, got {interval}")
        self.generator = generator
        self.dataset = dataset
        self.output_dir = Path(output_dir)
        self.sequences = list(sequences)
        self.interval = interval
        self.num_samples = num_samples
        self.device = torch.device(device)
        self.generator_call = generator_call
        self.seed = seed
        self.tag = tag
        self.written: list[Path] = []
        self._indices: list[int] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=_every_or_last(self.interval)), self)

    def _lesion_areas(self) -> np.ndarray:
        table = getattr(self.dataset, "slice_table", None)
        if table is not None and "lesion_fraction" in table and len(table) == len(self.dataset):
            return table["lesion_fraction"].to_numpy(dtype=float)
        areas = []
        for index in range(len(self.dataset)):
            label = np.asarray(self.dataset[index]["label"])
            areas.append(float(np.isin(label, LESION_LABELS).sum()))
        return np.asarray(areas)

    def sample_indices(self) -> list[int]:
        """The items drawn (see the class docstring), chosen on the first call."""
        if self._indices is None:
            count = min(self.num_samples, len(self.dataset))
            areas = self._lesion_areas() if count else np.zeros(0)
            lesion = [int(i) for i in np.argsort(-areas, kind="stable") if areas[i] > 0]
            chosen = lesion[:1]
            rest = np.random.default_rng(self.seed).permutation(lesion[1:]).tolist()
            chosen += [int(i) for i in rest[: count - len(chosen)]]
            if len(chosen) < count:  # too few lesion slices: the largest brain slices, evenly spaced
                others = [
                    i for i in np.linspace(0, len(self.dataset) - 1, count).astype(int) if i not in chosen
                ]
                chosen += [int(i) for i in others[: count - len(chosen)]]
            self._indices = chosen
        return list(self._indices)

    def __call__(self, engine: Engine) -> None:
        self.write(engine.state.epoch)

    def write(self, epoch: int) -> list[Path]:
        from medsynth.visualize.figures import save_grid

        indices = self.sample_indices()
        if not indices:
            return []
        items = [self.dataset[i] for i in indices]
        batch = TRAINING_BATCH(default_collate(items), self.device)
        generator = unwrap(self.generator)
        with eval_mode(generator), torch.no_grad():
            outputs = self.generator_call(generator, batch)
        images = _to_numpy(outputs["images"])
        confidence = _to_numpy(outputs["confidence"]) if "confidence" in outputs else None
        paths = []
        for n, (index, item) in enumerate(zip(indices, items, strict=True)):
            label = np.asarray(item["label"]).reshape(np.asarray(item["label"]).shape[-2:]).astype(np.int64)
            real = np.asarray(item["image"], dtype=np.float32)
            panels, overlays = [], []
            for s in range(len(self.sequences)):
                row = [np.zeros_like(real[s]), real[s], images[n, s]]
                if confidence is not None:
                    row.append(confidence[n, s])
                panels.append(row)
                overlays.append([label] + [None] * (len(row) - 1))
            columns = ["mask", "real", "synthesized"] + (["confidence"] if confidence is not None else [])
            patient = item.get("patient_id", "")
            where = (
                f"{patient} slice {int(item['slice_index'])}" if "slice_index" in item else f"item {index}"
            )
            stem = self.tag if self.tag else f"epoch_{epoch:04d}"
            path = self.output_dir / f"{stem}_sample_{n}.png"
            save_grid(
                panels,
                path,
                row_titles=[SEQUENCE_TITLES.get(s, s) for s in self.sequences],
                col_titles=columns,
                cmaps=["gray", "gray", "gray", "magma"][: len(columns)],
                vranges=[(0.0, 1.0), (-1.0, 1.0), (-1.0, 1.0), (0.0, 1.0)][: len(columns)],
                overlays=overlays,
                title=f"{self.tag.replace('_', ' ') if self.tag else f'epoch {epoch}'}: {where}",
                overlay_alpha=1.0,
            )
            paths.append(path)
        self.written.extend(paths)
        return paths


def _synthesis_output(output: Mapping[str, Any]) -> tuple:
    """``(pred, image, label, brain_mask, patient_id)`` of a synthesis evaluator's output (the last two
    ``None`` when the batch has none)."""
    return (
        output["pred"],
        output["image"],
        output["label"],
        output.get("brain_mask"),
        output.get("patient_id"),
    )


class SynthesisQualityMetric(Metric):
    """Ignite metric over :class:`medsynth.metrics.SynthesisMetrics` (the papers' Table I, plus the
    brain-masked columns when the batches carry ``brain_mask``).

    ``compute()`` returns the mean SSIM over sequences, so the metric can be an evaluator's key
    metric; the full table is left in ``engine.state.metric_details[name]`` and the per-case rows
    (:meth:`~medsynth.metrics.SynthesisMetrics.per_case`) in ``engine.state.metric_details[name + "_cases"]``.

    Args:
        sequences: sequence keys in channel order.
        tolerance: pixel-accuracy tolerance, in the metric's intensity units.
        output_transform: maps ``engine.state.output`` to ``(pred, target, label[, brain_mask,
            case_ids])``; the default reads ``pred``, ``image``, ``label``, ``brain_mask`` and
            ``patient_id`` of the synthesis evaluator's output.
        summary: the name of the scalar :meth:`compute` returns, a key of :func:`table_summary`.
    """

    def __init__(
        self,
        sequences: Sequence[str],
        tolerance: float = 16,
        output_transform: Callable = _synthesis_output,
        summary: str = "mean_ssim",
    ) -> None:
        self.sequences = list(sequences)
        self.tolerance = tolerance
        self.summary = summary
        self.table = None
        self.cases = None
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        from medsynth.metrics import SynthesisMetrics

        self._metrics = SynthesisMetrics(self.sequences, tolerance=self.tolerance)

    def update(self, output: Sequence[Any]) -> None:
        pred, target, label, *rest = output
        brain_mask, case_ids = (list(rest) + [None, None])[:2]
        self._metrics.update(pred, target, label, brain_mask, case_ids)

    def compute(self) -> float:
        self.table = self._metrics.aggregate()
        self.cases = self._metrics.per_case()
        return float(table_summary(self.table, self.sequences)[self.summary])

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        if not hasattr(engine.state, "metric_details") or engine.state.metric_details is None:
            engine.state.metric_details = {}
        engine.state.metric_details[name] = self.table
        engine.state.metric_details[f"{name}_cases"] = self.cases


def table_summary(table: Any, sequences: Sequence[str] | None = None) -> dict[str, float]:
    """Flat numbers of a Table I data frame (:meth:`medsynth.metrics.SynthesisMetrics.aggregate`):
    every cell as ``<row>/<column>`` plus, from the average row (the mean over sequences),
    ``mean_ssim``, ``mean_psnr``, ``mean_<class>_accuracy`` and, when present, ``mean_ssim_brain``,
    ``mean_psnr_brain`` and ``mean_mae_brain``."""
    from medsynth.metrics import AVERAGE_ROW

    flat: dict[str, float] = {}
    for row_name, row in table.iterrows():
        for column, value in row.items():
            flat[f"{row_name}/{column}"] = float(value)
    average = table.loc[AVERAGE_ROW]
    for column, value in average.items():
        name = str(column).lower().replace(" ", "_")
        key = f"mean_{name}" if name.split("_")[0] in ("ssim", "psnr", "mae") else f"mean_{name}_accuracy"
        flat[key] = float(value)
    return flat


class MetricsTableWriter:
    """After each evaluation write the Table I details of ``metric_name`` as CSV + Markdown, the
    per-case rows behind them as ``<table_name>_cases.csv`` (from which any table can be recomputed,
    :func:`medsynth.metrics.table_from_cases`), and a ``metrics.json`` with the flat numbers (attach
    to the evaluator).

    Args:
        output_dir: folder of the tables.
        sequences: sequence keys in channel order.
        metric_name: name under which :class:`SynthesisQualityMetric` is attached.
        table_name: file stem of the CSV / Markdown table.
        global_epoch_fn: returns the epoch recorded in ``metrics.json`` (default: the engine's epoch).
        extra: further entries of ``metrics.json`` (e.g. the dataset and the atlas evaluated with).
    """

    def __init__(
        self,
        output_dir: str,
        sequences: Sequence[str],
        metric_name: str = "mean_ssim",
        table_name: str = "table1",
        global_epoch_fn: Callable[[Engine], int] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.sequences = list(sequences)
        self.metric_name = metric_name
        self.table_name = table_name
        self.global_epoch_fn = global_epoch_fn
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def write_table_and_cases(self, engine: Engine) -> tuple[Any, Any, int]:
        """Write the metric's table and per-case rows; returns ``(table, cases, epoch)`` (subclasses
        write their own ``metrics.json`` from them)."""
        from medsynth.metrics import write_table

        table = engine.state.metric_details.get(self.metric_name)
        if table is None:
            raise RuntimeError(
                f"no table for metric {self.metric_name!r}; attach its metric to the evaluator"
            )
        write_table(table, self.output_dir, self.table_name)
        cases = engine.state.metric_details.get(f"{self.metric_name}_cases")
        if cases is not None:
            with atomic_path(self.output_dir / f"{self.table_name}_cases.csv") as tmp:
                cases.to_csv(tmp, index=False)
        epoch = self.global_epoch_fn(engine) if self.global_epoch_fn else int(engine.state.epoch)
        return table, cases, epoch

    def __call__(self, engine: Engine) -> None:
        table, cases, epoch = self.write_table_and_cases(engine)
        summary = table_summary(table, self.sequences)
        record = {
            "epoch": epoch,
            "sequences": self.sequences,
            "cases": table.attrs.get("cases"),
            **self.extra,
        }
        save_json({**record, **summary}, self.output_dir / "metrics.json")
        brain = (
            f", in the brain SSIM {summary['mean_ssim_brain']:.4f}, PSNR {summary['mean_psnr_brain']:.2f} "
            f"dB, "
            f"MAE {summary['mean_mae_brain']:.1f} grey levels"
            if "mean_mae_brain" in summary
            else ""
        )
        logger.info(
            "epoch %d: mean SSIM %.4f, mean PSNR %.2f dB%s (%s cases; tables in %s)",
            epoch,
            summary["mean_ssim"],
            summary["mean_psnr"],
            brain,
            table.attrs.get("cases", "?"),
            self.output_dir,
        )


class StructureSamplesHandler:
    """Every ``interval`` epochs (and after the last): structural maps sampled from N(0, 1) by the
    stage-1 VAE of Qu et al., their MASK predictions and the Algorithm 3 filter's verdicts.

    Writes ``epoch_<n>_structures.png`` (rows: sampled map, predicted brain area, filled closed
    contours; the column title says kept or refused and the MAE) and appends the epoch's pass rate
    to ``structure_filter.json`` with the samples' diversity (the mean fraction of pixels on which
    two binarised samples differ; 0 means a collapsed VAE whose codes all decode to one map); both
    are also put in ``engine.state.metrics`` (``structure_filter_pass_rate``,
    ``structure_sample_diversity``) for the stats handlers.

    Args:
        vae: :class:`medsynth.networks.qu.StructureVAE`.
        mask_generator: :class:`medsynth.networks.qu.MaskGenerator`.
        output_dir: folder of the figures and the JSON.
        image_size: height and width of the sampled maps.
        num_samples: maps per epoch (drawn with the same seed each time, so epochs compare).
        interval: epochs between samplings.
        mae_threshold: Algorithm 3's threshold.
        device: where the networks run.
        seed: of the codes.
    """

    def __init__(
        self,
        vae: torch.nn.Module,
        mask_generator: torch.nn.Module,
        output_dir: str,
        image_size: int,
        num_samples: int = 16,
        interval: int = 1,
        mae_threshold: float = 0.05,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        from medsynth.transforms.structure import StructuralMapFilter

        if interval < 1 or num_samples < 1:
            raise ValueError(f"interval and num_samples must be >= 1, got {interval}, {num_samples}")
        self.vae, self.mask_generator = vae, mask_generator
        self.output_dir, self.image_size = Path(output_dir), int(image_size)
        self.num_samples, self.interval = int(num_samples), int(interval)
        self.filter = StructuralMapFilter(mae_threshold)
        self.device, self.seed = torch.device(device), int(seed)
        self.history: list[dict[str, float]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=_every_or_last(self.interval)), self)

    def sample(self) -> tuple[np.ndarray, np.ndarray, list[float]]:
        """``(maps, masks, maes)`` of this epoch's samples, ``(N, H, W)`` each."""
        vae, mask_generator = unwrap(self.vae), unwrap(self.mask_generator)
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        with eval_mode(vae, mask_generator), torch.no_grad():
            maps = vae.sample(self.num_samples, self.image_size, self.image_size, generator=generator)
            masks = mask_generator(maps)
        maps_np, masks_np = _to_numpy(maps)[:, 0], (_to_numpy(masks)[:, 0] > 0.5).astype(np.float32)
        maes = [self.filter.mae(m, k) for m, k in zip(maps_np, masks_np, strict=True)]
        return maps_np, masks_np, maes

    def __call__(self, engine: Engine) -> None:
        from medsynth.transforms.structure import closed_contour_mask
        from medsynth.visualize.figures import save_grid

        maps, masks, maes = self.sample()
        kept = [mae < self.filter.mae_threshold for mae in maes]
        rate = float(np.mean(kept))
        epoch = engine.state.epoch
        engine.state.metrics["structure_filter_pass_rate"] = rate
        # How different the samples are (0: every code decodes to the same map, a collapsed VAE).
        binary = maps > 0.5
        pairs = [(i, j) for i in range(len(maps)) for j in range(i + 1, len(maps))]
        diversity = float(np.mean([np.mean(binary[i] != binary[j]) for i, j in pairs])) if pairs else 0.0
        engine.state.metrics["structure_sample_diversity"] = diversity
        self.history.append(
            {"epoch": epoch, "pass_rate": rate, "mean_mae": float(np.mean(maes)), "diversity": diversity}
        )
        shown = range(min(8, len(maps)))
        filled = [closed_contour_mask(maps[i], self.filter.sigma, self.filter.level) for i in shown]
        save_grid(
            [[maps[i] for i in shown], [masks[i] for i in shown], filled],
            self.output_dir / f"epoch_{epoch:04d}_structures.png",
            row_titles=["sampled map", "MASK", "filled contours"],
            col_titles=[f"{'kept' if kept[i] else 'refused'} ({maes[i]:.3f})" for i in shown],
            vranges=(0.0, 1.0),
            title=f"epoch {epoch}: structural maps from N(0, 1), {100 * rate:.0f}% pass Algorithm 3",
            orientation="none",
        )
        save_json(self.history, self.output_dir / "structure_filter.json")
        logger.info(
            "epoch %d: %.0f%% of %d sampled structural maps pass the filter", epoch, 100 * rate, len(maps)
        )


class GenerationSamplesHandler:
    """Every ``interval`` epochs (and after the last): what stage 2 of Qu et al. makes of a few fixed
    training slices, ``epoch_<n>_generation_<k>.png``.

    Row 1: the slice's structural map (own lesion cleared), the fused label (drawn from the other
    samples, accepted inside the map's brain area, else its own), and each generated sequence; row
    2: the real slice's sequences, for comparison (they need not match: the label may be another's).

    It is attached to a :class:`medsynth.engines.MultimodalGenerationTrainer`, whose fusion it reuses.

    Args:
        dataset: training items (``image``, ``mask``, ``label``).
        output_dir: PNG folder.
        sequences: sequence keys in channel order.
        interval: epochs between grids.
        num_samples: slices shown (the largest lesions first, as :class:`SampleGridHandler` picks).
        device: where the generator runs.
        seed: of the label draws for the figure (the trainer's own bank is not touched).
    """

    def __init__(
        self,
        dataset: Sequence[Mapping[str, Any]],
        output_dir: str,
        sequences: Sequence[str],
        interval: int = 1,
        num_samples: int = 2,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        if interval < 1:
            raise ValueError(f"sample interval must be at least 1, got {interval}")
        self.dataset, self.trainer = dataset, None
        self.output_dir, self.sequences = Path(output_dir), list(sequences)
        self.interval, self.device, self.seed = int(interval), torch.device(device), int(seed)
        # The same slices every epoch, chosen as the synthesis grids choose theirs.
        self.picker = SampleGridHandler(
            None, dataset, output_dir, sequences, num_samples=num_samples, seed=seed
        )

    def attach(self, engine: Engine) -> None:
        self.trainer = engine
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=_every_or_last(self.interval)), self)

    def __call__(self, engine: Engine) -> None:
        from medsynth.engines.qu import LabelBank
        from medsynth.visualize.figures import save_grid

        indices = self.picker.sample_indices()
        if not indices:
            return
        batch = TRAINING_BATCH(default_collate([self.dataset[i] for i in indices]), self.device)
        trainer_bank, self.trainer.label_bank = self.trainer.label_bank, LabelBank(seed=self.seed)
        try:
            self.trainer.label_bank.add(batch["label"].roll(1, dims=0))
            fused, onehot, structure = self.trainer.fuse(batch)
        finally:
            self.trainer.label_bank = trainer_bank
        generator = unwrap(self.trainer.networks["generator"])
        with eval_mode(generator), torch.no_grad():
            generated = _to_numpy(generator.generate(fused))
        real = _to_numpy(batch["image"])
        labels, structure = _to_numpy(onehot.argmax(dim=1)).astype(np.int64), _to_numpy(structure)[:, 0]
        for n in range(len(indices)):
            panels = [[structure[n], np.zeros_like(structure[n]), *generated[n]], [None, None, *real[n]]]
            overlays = [
                [None, labels[n], *([None] * len(self.sequences))],
                [None] * (2 + len(self.sequences)),
            ]
            save_grid(
                panels,
                self.output_dir / f"epoch_{engine.state.epoch:04d}_generation_{n}.png",
                row_titles=["generated", "real slice"],
                col_titles=["structure", "fused label", *[SEQUENCE_TITLES.get(s, s) for s in self.sequences]],
                vranges=[(0.0, 1.0), (0.0, 1.0), *([(-1.0, 1.0)] * len(self.sequences))],
                overlays=overlays,
                overlay_alpha=1.0,
                title=f"epoch {engine.state.epoch}: sequences generated from a structural map and a label",
            )

"""Training and evaluation engines of the SAMR / CG-SAMR synthesis models (MONAI / ignite)."""

from medsynth.engines.evaluator import SynthesisEvaluator, prepare_evaluation_batch
from medsynth.engines.handlers import (
    BestModelSaver,
    CheckpointPruner,
    MetricsTableWriter,
    PeriodicValidationHandler,
    ResumeCheckpointLoader,
    SampleGridHandler,
    SynthesisQualityMetric,
    checkpoints_by_epoch,
    latest_checkpoint,
    table_summary,
)
from medsynth.engines.schedules import LinearDecay
from medsynth.engines.trainer import SynthesisGANTrainer, prepare_synthesis_batch

__all__ = [
    "BestModelSaver",
    "CheckpointPruner",
    "LinearDecay",
    "MetricsTableWriter",
    "PeriodicValidationHandler",
    "ResumeCheckpointLoader",
    "SampleGridHandler",
    "SynthesisEvaluator",
    "SynthesisGANTrainer",
    "SynthesisQualityMetric",
    "checkpoints_by_epoch",
    "latest_checkpoint",
    "prepare_evaluation_batch",
    "prepare_synthesis_batch",
    "table_summary",
]

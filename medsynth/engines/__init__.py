"""Training and evaluation engines (MONAI / ignite): one adversarial base and a subclass per method family."""

from medsynth.engines.adversarial import AdversarialTrainer, unwrap
from medsynth.engines.conditional import ConditionalGANTrainer
from medsynth.engines.evaluator import SynthesisEvaluator
from medsynth.engines.handlers import (
    BestModelSaver,
    CheckpointPruner,
    GenerationSamplesHandler,
    MetricsTableWriter,
    ModelAtlasSaver,
    PeriodicValidationHandler,
    ResumeCheckpointLoader,
    SampleGridHandler,
    SamplerEpochSetter,
    StructureSamplesHandler,
    SynthesisQualityMetric,
    TrainingTimeEstimate,
    checkpoints_by_epoch,
    latest_checkpoint,
    table_summary,
)
from medsynth.engines.qu import LabelBank, MultimodalGenerationTrainer, StructuralMapTrainer
from medsynth.engines.samr import SynthesisGANTrainer
from medsynth.engines.schedules import linear_decay_schedule
from medsynth.engines.segmentation import (
    LesionSegmentationMetric,
    PrepareBatchWithWeights,
    SegmentationTableWriter,
    segmentation_summary,
)
from medsynth.engines.unpaired import (
    CycleGANTrainer,
    ImagePool,
    MaskFromImagesTableWriter,
    UNITTrainer,
    UnpairedGANTrainer,
)
from medsynth.engines.utils import BatchCall, PrepareDictBatch

__all__ = [
    "AdversarialTrainer",
    "BatchCall",
    "BestModelSaver",
    "CheckpointPruner",
    "MetricsTableWriter",
    "LesionSegmentationMetric",
    "ConditionalGANTrainer",
    "PrepareBatchWithWeights",
    "ModelAtlasSaver",
    "PeriodicValidationHandler",
    "PrepareDictBatch",
    "ResumeCheckpointLoader",
    "SampleGridHandler",
    "StructureSamplesHandler",
    "GenerationSamplesHandler",
    "StructuralMapTrainer",
    "MultimodalGenerationTrainer",
    "LabelBank",
    "SegmentationTableWriter",
    "SynthesisEvaluator",
    "SynthesisGANTrainer",
    "UnpairedGANTrainer",
    "UNITTrainer",
    "CycleGANTrainer",
    "ImagePool",
    "MaskFromImagesTableWriter",
    "SynthesisQualityMetric",
    "SamplerEpochSetter",
    "TrainingTimeEstimate",
    "checkpoints_by_epoch",
    "latest_checkpoint",
    "linear_decay_schedule",
    "segmentation_summary",
    "table_summary",
    "unwrap",
]

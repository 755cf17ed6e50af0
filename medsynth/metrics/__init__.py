"""Evaluation metrics: synthesis quality (Table I) and segmentation quality (Table II), and their tables."""

from medsynth.metrics.segmentation import (
    SEGMENTATION_CLASSES,
    SEGMENTATION_COLUMNS,
    SegmentationMetrics,
    binary_dice,
)
from medsynth.metrics.synthesis import (
    AVERAGE_ROW,
    BRAIN_COLUMNS,
    SYNTHESIS_CLASSES,
    SynthesisMetrics,
    table_from_cases,
    to_uint8_scale,
)
from medsynth.metrics.tables import comparison_table, to_markdown, write_comparison_table, write_table

__all__ = [
    "AVERAGE_ROW",
    "SEGMENTATION_CLASSES",
    "SEGMENTATION_COLUMNS",
    "SYNTHESIS_CLASSES",
    "SegmentationMetrics",
    "SynthesisMetrics",
    "BRAIN_COLUMNS",
    "table_from_cases",
    "binary_dice",
    "comparison_table",
    "to_markdown",
    "to_uint8_scale",
    "write_comparison_table",
    "write_table",
]

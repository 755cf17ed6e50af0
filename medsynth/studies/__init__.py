"""Augmentation studies: does synthesis help a segmentation model? The runner behind ``medsynth
study`` (:mod:`.runner`) and the aggregation with bootstrap intervals and paired tests
(:mod:`.aggregate`)."""

from medsynth.studies.aggregate import (
    bootstrap_mean,
    collect_cases,
    paired_difference,
    study_table,
    write_report,
)
from medsynth.studies.runner import Cell, StudySpec, expand_cells, run_study, score_cohort

__all__ = [
    "Cell",
    "StudySpec",
    "bootstrap_mean",
    "collect_cases",
    "expand_cells",
    "paired_difference",
    "run_study",
    "score_cohort",
    "study_table",
    "write_report",
]

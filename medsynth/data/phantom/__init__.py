"""Digital phantom cohort: medsynth's built-in, download-free glioma MRI data.

The MNI152 2009 template that nilearn ships is warped per patient, given a lobulated glioma (tumour,
cavity, edema) and imaged in five sequences (T1w, Gd-T1w, T2w, FLAIR, APTw) through a documented
per-tissue contrast model (see ``docs/phantom.md``). Two layouts: ``ready`` (preprocessed, model grid,
manifest and atlas) and ``raw`` (scanner-like exams with skull, bias field, misalignment, a DICOM
series, and the ground truth to score preprocessing).
"""

from medsynth.data.phantom.cohort import LAYOUTS, generate_phantom_cohort, patient_id, ready_paths
from medsynth.data.phantom.contrast import CONTRAST_TABLE, TissueContrast, contrast_table_markdown
from medsynth.data.phantom.patient import DEFAULT_SHAPE, DEFAULT_SPACING_MM, PhantomPatient, reference_grid

__all__ = [
    "CONTRAST_TABLE",
    "DEFAULT_SHAPE",
    "DEFAULT_SPACING_MM",
    "LAYOUTS",
    "PhantomPatient",
    "TissueContrast",
    "contrast_table_markdown",
    "generate_phantom_cohort",
    "patient_id",
    "ready_paths",
    "reference_grid",
]

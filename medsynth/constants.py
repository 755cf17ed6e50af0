"""Names shared by every part of medsynth: sequences, label values, regions of interest.

The label convention follows the SAMR / CG-SAMR papers: 0 background, 1 normal brain,
2 edema, 3 cavity (surgical cavity or necrosis), 4 tumour.
"""

from __future__ import annotations

# Sequence keys, in the channel order every network output and every manifest uses.
CLINICAL_SEQUENCES: tuple[str, ...] = ("t1w", "gd_t1w", "t2w", "flair", "aptw")
BRATS_SEQUENCES: tuple[str, ...] = ("t1w", "gd_t1w", "t2w", "flair")
SEQUENCE_TITLES: dict[str, str] = {
    "t1w": "T1w",
    "gd_t1w": "Gd-T1w",
    "t2w": "T2w",
    "flair": "FLAIR",
    "aptw": "APTw",
}

BACKGROUND, NORMAL_BRAIN, EDEMA, CAVITY, TUMOR = 0, 1, 2, 3, 4
LABEL_NAMES: dict[int, str] = {
    BACKGROUND: "background",
    NORMAL_BRAIN: "normal_brain",
    EDEMA: "edema",
    CAVITY: "cavity",
    TUMOR: "tumor",
}
NUM_LABELS = len(LABEL_NAMES)
LESION_LABELS: tuple[int, ...] = (EDEMA, CAVITY, TUMOR)

# Brain-mask voxels at or above this value are brain (masks may be 0/1, 0/255 or probabilities).
BRAIN_MASK_THRESHOLD = 0.5

# Atlas input of the generators: the instance's axial slice and ATLAS_NEIGHBOURS slices on each side,
# per sequence (channel 3 * i + k holds sequence i at slice z + k - ATLAS_NEIGHBOURS).
ATLAS_NEIGHBOURS = 1
ATLAS_SLICES_PER_SEQUENCE = 2 * ATLAS_NEIGHBOURS + 1

# The three regions of the label-wise discriminators, each a set of label values.
ROI_LABELS: dict[str, tuple[int, ...]] = {
    "background": (BACKGROUND,),
    "normal_brain": (NORMAL_BRAIN,),
    "lesion": LESION_LABELS,
}

# BraTS `seg` values to the label convention above (brain voxels with seg 0 become normal brain).
BRATS_SEG_TO_LABEL: dict[int, int] = {0: NORMAL_BRAIN, 2: EDEMA, 1: CAVITY, 4: TUMOR}
# BraTS 2023 `seg` values (3 is the enhancing tumour there) to the same convention.
BRATS2023_SEG_TO_LABEL: dict[int, int] = {0: NORMAL_BRAIN, 2: EDEMA, 1: CAVITY, 3: TUMOR}

# Names of the lesion-mask manipulations (medsynth.transforms.LesionManipulation; the inference
# configs' and the CLI's ``manipulation``): SAMR Fig. 3, CG-SAMR Fig. 7.
MANIPULATIONS: tuple[str, ...] = ("none", "mirror", "grow", "shrink", "transplant", "random")

# Manifest columns besides one path column per sequence and one `atlas_<sequence>` column per sequence.
MANIFEST_ID_COLUMNS: tuple[str, ...] = ("patient_id", "split")
MANIFEST_LABEL_COLUMN = "label"
MANIFEST_BRAIN_MASK_COLUMN = "brain_mask"
SPLITS: tuple[str, ...] = ("train", "val", "test")


def atlas_column(sequence: str) -> str:
    """Manifest column holding the atlas path of ``sequence``."""
    return f"atlas_{sequence}"


def confidence_column(sequence: str) -> str:
    """Manifest column (and file stem) of a synthetic case's confidence map of ``sequence``
    (:func:`medsynth.data.manifest.stored_path_columns` lists it)."""
    return f"confidence_{sequence}"


# Brain-tissue probability maps (Shin et al. 2018's conditioning, made by ANTs Atropos in preprocessing
# or given by the phantom's ground truth), in channel order; optional manifest columns tissue_<class>.
TISSUE_CLASSES: tuple[str, ...] = ("csf", "gm", "wm")
TISSUE_TITLES: dict[str, str] = {"csf": "CSF", "gm": "grey matter", "wm": "white matter"}


def tissue_column(tissue_class: str) -> str:
    """Manifest column holding the path of a patient's ``tissue_class`` probability map."""
    if tissue_class not in TISSUE_CLASSES:
        raise ValueError(f"unknown tissue class {tissue_class!r}; known: {TISSUE_CLASSES}")
    return f"tissue_{tissue_class}"


TISSUE_COLUMNS: tuple[str, ...] = tuple(tissue_column(t) for t in TISSUE_CLASSES)


# File-name stems seen in the wild for each sequence (raw exams, BraTS, TCGA), lower case.
SEQUENCE_ALIASES: dict[str, str] = {
    "t1": "t1w",
    "t1w": "t1w",
    "t1c": "gd_t1w",
    "t1ce": "gd_t1w",
    "t1gd": "gd_t1w",
    "gd_t1w": "gd_t1w",
    "gdt1w": "gd_t1w",
    "t2": "t2w",
    "t2w": "t2w",
    "flair": "flair",
    "t2flair": "flair",
    "apt": "aptw",
    "aptw": "aptw",
}


def canonical_sequence(name: str) -> str:
    """Map a file-name stem such as ``t1ce`` or ``T2`` to its sequence key; raises ``ValueError``."""
    key = name.lower().replace("-", "").replace(" ", "")
    if key in SEQUENCE_ALIASES:
        return SEQUENCE_ALIASES[key]
    raise ValueError(f"unknown sequence name {name!r}; known: {sorted(SEQUENCE_ALIASES)}")

"""The phantom's contrast model: per-tissue intensity of each sequence (documented in docs/phantom.md).

Each entry gives the range a patient's tissue mean is drawn from (one draw per patient and tissue,
so contrasts vary naturally between patients but keep their radiological order) and the standard
deviation of the smooth within-tissue texture. Anatomical sequences are in arbitrary positive units
(white matter on T1w near 600, background 0); APTw is in percent (MTR asymmetry at 3.5 ppm).

The ordering follows radiology and the SAMR / CG-SAMR papers: CSF dark on T1w and FLAIR and bright
on T2w; white matter brighter than grey matter on T1w and darker on T2w/FLAIR; edema hyperintense on
T2w/FLAIR and mildly hypointense on T1w; tumour enhancing on Gd-T1w and hyperintense on T2w; cavity
fluid-like (bright T2w, dark to mildly bright FLAIR, no enhancement); APTw near 0 % in normal tissue,
about +1 % in edema, +3 to +4.2 % in tumour tissue (partial volume brings tumour-labelled voxels to
about +2.3 to +3.5 %), near 0 % in the cavity and mildly positive in CSF.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medsynth.constants import CLINICAL_SEQUENCES

ANATOMICAL_SEQUENCES: tuple[str, ...] = ("t1w", "gd_t1w", "t2w", "flair")
# Brain and lesion tissues, then the head shells of the raw layout ("extra_csf" reuses "csf").
TISSUES: tuple[str, ...] = ("csf", "gm", "wm", "edema", "cavity", "tumor", "bone", "marrow", "fat", "skin")


@dataclass(frozen=True)
class TissueContrast:
    """A tissue in one sequence: patient means are drawn from ``[mean_low, mean_high]``; ``texture_sd`` scales
    a unit smooth random field."""

    mean_low: float
    mean_high: float
    texture_sd: float


def _table(rows: dict[str, tuple[float, float, float]]) -> dict[str, TissueContrast]:
    return {tissue: TissueContrast(*values) for tissue, values in rows.items()}


# fmt: off
CONTRAST_TABLE: dict[str, dict[str, TissueContrast]] = {
    "t1w": _table({
        "csf": (120, 180, 12), "gm": (410, 460, 18), "wm": (580, 640, 18),
        "edema": (330, 390, 25), "cavity": (130, 200, 18), "tumor": (380, 450, 35),
        "bone": (20, 40, 8), "marrow": (450, 560, 50), "fat": (780, 880, 40), "skin": (300, 380, 30),
    }),
    "gd_t1w": _table({
        "csf": (140, 200, 12), "gm": (430, 480, 18), "wm": (590, 650, 18),
        "edema": (350, 410, 25), "cavity": (140, 210, 18), "tumor": (800, 950, 80),
        "bone": (20, 40, 8), "marrow": (470, 580, 50), "fat": (780, 880, 40), "skin": (420, 520, 40),
    }),
    "t2w": _table({
        "csf": (900, 1000, 25), "gm": (560, 620, 22), "wm": (390, 440, 18),
        "edema": (720, 820, 40), "cavity": (860, 980, 35), "tumor": (620, 720, 50),
        "bone": (20, 40, 8), "marrow": (300, 400, 45), "fat": (550, 650, 40), "skin": (250, 330, 30),
    }),
    "flair": _table({
        "csf": (70, 120, 12), "gm": (520, 570, 20), "wm": (400, 440, 18),
        "edema": (760, 880, 45), "cavity": (120, 420, 35), "tumor": (620, 720, 50),
        "bone": (20, 40, 8), "marrow": (350, 450, 45), "fat": (620, 720, 40), "skin": (300, 380, 30),
    }),
    "aptw": _table({
        "csf": (0.5, 1.5, 0.3), "gm": (0.1, 0.5, 0.25), "wm": (-0.2, 0.3, 0.25),
        "edema": (0.8, 1.5, 0.3), "cavity": (-0.3, 0.5, 0.3), "tumor": (3.0, 4.2, 0.6),
        "bone": (0.0, 0.5, 0.5), "marrow": (-2.0, -0.5, 0.8), "fat": (-3.0, -1.0, 1.0),
        "skin": (0.0, 1.0, 0.5),
    }),
}
# fmt: on

# Rician noise level of the anatomical sequences (same units as the table), Gaussian noise of APTw (%)
# before its in-plane smoothing, and the APTw point-spread (full width at half maximum, mm).
NOISE_SIGMA: dict[str, float] = {"t1w": 10.0, "gd_t1w": 10.0, "t2w": 12.0, "flair": 10.0, "aptw": 0.6}
APTW_FWHM_MM: float = 2.2


@dataclass
class PatientContrast:
    """One patient's tissue means ``means[sequence][tissue]`` and texture SDs drawn from the table."""

    means: dict[str, dict[str, float]]
    texture_sd: dict[str, dict[str, float]]

    def value(self, sequence: str, tissue: str) -> float:
        return self.means[sequence]["csf" if tissue == "extra_csf" else tissue]


def random_contrast(
    rng: np.random.Generator, table: dict[str, dict[str, TissueContrast]] = CONTRAST_TABLE
) -> PatientContrast:
    """Draw one patient's tissue means; every sequence of :data:`CLINICAL_SEQUENCES` must be in ``table``."""
    missing = [s for s in CLINICAL_SEQUENCES if s not in table]
    if missing:
        raise ValueError(f"contrast table lacks sequence(s) {missing}")
    means: dict[str, dict[str, float]] = {}
    texture: dict[str, dict[str, float]] = {}
    for sequence in CLINICAL_SEQUENCES:
        means[sequence] = {}
        texture[sequence] = {}
        for tissue in TISSUES:
            entry = table[sequence][tissue]
            means[sequence][tissue] = float(rng.uniform(entry.mean_low, entry.mean_high))
            texture[sequence][tissue] = float(entry.texture_sd)
    return PatientContrast(means=means, texture_sd=texture)


def contrast_table_markdown(table: dict[str, dict[str, TissueContrast]] = CONTRAST_TABLE) -> str:
    """The table as Markdown (``mean_low to mean_high (texture SD)``), for the documentation."""
    header = "| tissue | " + " | ".join(CLINICAL_SEQUENCES) + " |"
    lines = [header, "|" + "---|" * (len(CLINICAL_SEQUENCES) + 1)]
    for tissue in TISSUES:
        cells = []
        for sequence in CLINICAL_SEQUENCES:
            entry = table[sequence][tissue]
            cells.append(f"{entry.mean_low:g} to {entry.mean_high:g} ({entry.texture_sd:g})")
        lines.append(f"| {tissue} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

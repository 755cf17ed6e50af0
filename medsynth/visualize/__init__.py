"""Figures for people: image grids, label overlays, contact sheets of synthetic cohorts."""

from medsynth.visualize.contact import contact_sheet
from medsynth.visualize.figures import LABEL_COLORS, label_to_rgb, orient_for_display, save_grid

__all__ = ["LABEL_COLORS", "contact_sheet", "label_to_rgb", "orient_for_display", "save_grid"]

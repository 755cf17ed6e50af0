"""Figures for people: image grids, label overlays."""

from medsynth.visualize.figures import LABEL_COLORS, label_to_rgb, orient_for_display, save_grid

__all__ = ["LABEL_COLORS", "label_to_rgb", "orient_for_display", "save_grid"]

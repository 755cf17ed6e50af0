"""The shared figure helper (medsynth.visualize.figures)."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from medsynth.visualize import LABEL_COLORS, label_to_rgb, orient_for_display, save_grid


def test_label_colours_follow_the_papers():
    rgb = label_to_rgb(np.array([[0, 1], [2, 4]]))
    assert rgb.shape == (2, 2, 3)
    np.testing.assert_allclose(rgb[0, 0], (0, 0, 0))
    np.testing.assert_allclose(rgb[1, 0], LABEL_COLORS[2])
    assert rgb[1, 0, 1] > rgb[1, 0, 0]  # edema green
    yellow = np.asarray(LABEL_COLORS[4])
    assert yellow[0] > 0.8 and yellow[1] > 0.8 and yellow[2] < 0.2
    blue = np.asarray(LABEL_COLORS[3])
    assert blue[2] > blue[0] and blue[2] > blue[1]
    with pytest.raises(ValueError, match="7"):
        label_to_rgb(np.array([7]))


def test_radiological_orientation():
    # An axial RAS slice [x, y]: a mark at the patient's right (large x) and front (large y).
    slice_ = np.zeros((10, 20))
    slice_[9, 19] = 1
    shown = orient_for_display(slice_)
    assert shown.shape == (20, 10)  # rows run front-to-back, columns across
    assert shown[0, 0] == 1  # anterior at the top, patient's right on the viewer's left
    assert orient_for_display(slice_, "neurological")[0, -1] == 1


def test_save_grid_writes_png_with_overlays_and_contours(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.random((32, 40))
    labels = np.zeros((32, 40), dtype=np.uint8)
    labels[5:15, 5:15] = 4
    mask = labels > 0
    path = save_grid(
        [[image, image], [None, image]],
        tmp_path / "grid.png",
        row_titles=["a", "b"],
        col_titles=["one", "two"],
        cmaps=["gray", "jet"],
        vranges=[None, (0.0, 1.0)],
        overlays=[[labels, None], [None, None]],
        contours=[[None, mask], [None, None]],
        title="test",
        panel_size=1.0,
        dpi=50,
    )
    pixels = mpimg.imread(path)
    assert pixels.shape[0] >= 100 and pixels.shape[1] >= 100
    # The yellow tumour overlay shows up: some pixels are far more red+green than blue.
    assert ((pixels[..., 0] > 0.5) & (pixels[..., 1] > 0.5) & (pixels[..., 2] < 0.3)).any()
    assert not list(tmp_path.glob(".grid.png*"))  # no temporary file left behind


def test_save_grid_rejects_mismatched_layouts(tmp_path):
    image = np.zeros((8, 8))
    with pytest.raises(ValueError, match="cmaps"):
        save_grid([[image, image]], tmp_path / "x.png", cmaps=["gray"])
    with pytest.raises(ValueError, match="overlay"):
        save_grid([[image]], tmp_path / "x.png", overlays=[[np.zeros((4, 4), dtype=int)]])
    with pytest.raises(ValueError, match="2D"):
        save_grid([[np.zeros((2, 2, 2))]], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_per_column_ranges_may_be_left_to_percentiles(tmp_path):
    image = np.linspace(0, 1, 64).reshape(8, 8)
    for vranges in ([None, None], (0, 1), [(0.0, 1.0), (None, 2.0)]):
        assert save_grid([[image, image]], tmp_path / "r.png", vranges=vranges).is_file()

"""Known-answer tests of the synthesis (Table I) and segmentation (Table II) metrics and tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from medsynth.constants import CAVITY, EDEMA, NORMAL_BRAIN, TUMOR
from medsynth.metrics import (
    AVERAGE_ROW,
    BRAIN_COLUMNS,
    SegmentationMetrics,
    SynthesisMetrics,
    comparison_table,
    to_markdown,
    write_comparison_table,
    write_table,
)

SIZE = 16


def from_uint8(values: np.ndarray) -> torch.Tensor:
    """0-255 intensities to the networks' [-1, 1] scale (float32, as a network would output)."""
    return torch.as_tensor(np.asarray(values, dtype=np.float64) / 127.5 - 1.0, dtype=torch.float32)


def labelled_slice() -> np.ndarray:
    """16 x 16 label map: 10 edema, 4 cavity, 5 tumour pixels in normal brain."""
    label = np.full((SIZE, SIZE), NORMAL_BRAIN, dtype=np.int64)
    label[0, :] = 0
    label[2, 0:10] = EDEMA
    label[4, 0:4] = CAVITY
    label[6, 0:5] = TUMOR
    return label


# ---------------------------------------------------------------------------------------------
# Synthesis metrics
# ---------------------------------------------------------------------------------------------


def test_pixel_accuracy_exact_percentages_per_class_and_sequence():
    label = labelled_slice()
    target = np.full((2, SIZE, SIZE), 100.0)
    pred = target.copy()
    pred[0, 2, 0:3] += 30  # sequence 0: 3 of 10 edema pixels wrong -> 70 %
    pred[0, 4, 0:1] -= 17  # 1 of 4 cavity pixels wrong -> 75 %
    pred[1, 6, 0:5] += 40  # sequence 1: all 5 tumour pixels wrong -> 0 %
    pred[1, 2, 0:10] += 10  # within tolerance -> edema 100 %
    metrics = SynthesisMetrics(("t1w", "flair"))
    metrics.update(from_uint8(pred[None]), from_uint8(target[None]), torch.as_tensor(label[None, None]))
    table = metrics.aggregate()

    assert list(table.columns) == ["Edema", "Cavity", "Tumor", "SSIM", "PSNR"]
    assert list(table.index) == ["T1w", "FLAIR", AVERAGE_ROW]
    assert table.loc["T1w", ["Edema", "Cavity", "Tumor"]].tolist() == pytest.approx([70.0, 75.0, 100.0])
    assert table.loc["FLAIR", ["Edema", "Cavity", "Tumor"]].tolist() == pytest.approx([100.0, 100.0, 0.0])
    assert table.loc[AVERAGE_ROW, ["Edema", "Cavity", "Tumor"]].tolist() == pytest.approx([85.0, 87.5, 50.0])

    # The ablation tables score the whole lesion (union of the classes): 19 pixels.
    union = SynthesisMetrics(("t1w", "flair"), classes={"Lesion": (EDEMA, CAVITY, TUMOR)})
    union.update(from_uint8(pred[None]), from_uint8(target[None]), torch.as_tensor(label[None, None]))
    assert union.aggregate()["Lesion"].tolist() == pytest.approx(
        [100 * 15 / 19, 100 * 14 / 19, 100 * 29 / 38]
    )


def test_tolerance_boundary_is_inclusive_at_16():
    label = np.full((SIZE, SIZE), EDEMA, dtype=np.int64)
    target = np.full((1, SIZE, SIZE), 120.0)
    pred = target.copy()
    # Row by row: +16 and -16 count as correct, +16.5, -17 and +17 do not.
    pred[0, 0] += 16.0
    pred[0, 1] -= 16.0
    pred[0, 2] += 16.5
    pred[0, 3] -= 17.0
    pred[0, 4] += 17.0
    metrics = SynthesisMetrics(("t2w",))
    metrics.update(from_uint8(pred[None]), from_uint8(target[None]), torch.as_tensor(label[None]))
    expected = 100.0 * (SIZE * SIZE - 3 * SIZE) / (SIZE * SIZE)
    assert metrics.aggregate().loc["T2w", "Edema"] == pytest.approx(expected)

    strict = SynthesisMetrics(("t2w",), tolerance=15.9)
    strict.update(from_uint8(pred[None]), from_uint8(target[None]), torch.as_tensor(label[None]))
    assert strict.aggregate().loc["T2w", "Edema"] == pytest.approx(
        100.0 * (SIZE * SIZE - 5 * SIZE) / (SIZE * SIZE)
    )


def test_identical_images_give_ssim_one_and_infinite_psnr():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, 24, 24, generator=generator) * 2 - 1
    label = torch.as_tensor(np.stack([labelled_slice()] * 3))[:, None]
    label = torch.nn.functional.pad(label, (0, 8, 0, 8), value=NORMAL_BRAIN)
    metrics = SynthesisMetrics(("t1w", "gd_t1w"))
    metrics.update(images, images.clone(), label)
    table = metrics.aggregate()
    assert table["SSIM"].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    assert all(math.isinf(v) and v > 0 for v in table["PSNR"])
    assert table.loc[AVERAGE_ROW, ["Edema", "Cavity", "Tumor"]].tolist() == [100.0, 100.0, 100.0]


def test_psnr_matches_closed_form_for_a_constant_offset():
    generator = torch.Generator().manual_seed(1)
    target_u8 = 50.0 + 150.0 * torch.rand(2, 1, 20, 20, generator=generator, dtype=torch.float64)
    offset = 10.0
    metrics = SynthesisMetrics(("flair",))
    metrics.update(
        from_uint8(target_u8 + offset), from_uint8(target_u8), torch.ones(2, 1, 20, 20, dtype=torch.long)
    )
    table = metrics.aggregate()
    # MSE = offset ** 2 on the 0-255 scale with data range 255.
    assert table.loc["FLAIR", "PSNR"] == pytest.approx(20 * math.log10(255.0 / offset), abs=1e-3)
    assert table.loc["FLAIR", "SSIM"] < 1.0


def test_pixels_pooled_over_batches_and_absent_class_is_nan():
    label = np.full((SIZE, SIZE), NORMAL_BRAIN, dtype=np.int64)
    first, second = label.copy(), label.copy()
    first[1, 0:4] = EDEMA  # 4 edema pixels, all correct
    second[1, 0:12] = EDEMA  # 12 edema pixels, all wrong
    target = np.zeros((1, 1, SIZE, SIZE)) + 60.0
    wrong = target + 50.0
    metrics = SynthesisMetrics(("aptw",))
    metrics.update(from_uint8(target), from_uint8(target), torch.as_tensor(first[None, None]))
    metrics.update(from_uint8(wrong), from_uint8(target), torch.as_tensor(second[None, None]))
    table = metrics.aggregate()
    assert table.loc["APTw", "Edema"] == pytest.approx(25.0)
    assert math.isnan(table.loc["APTw", "Cavity"]) and math.isnan(table.loc["APTw", "Tumor"])
    assert math.isnan(table.loc[AVERAGE_ROW, "Tumor"])
    assert any("cavity" in note for note in table.attrs["notes"])
    assert table.attrs["images"] == 2

    metrics.reset()
    with pytest.raises(ValueError, match="no batch"):
        metrics.aggregate()


def test_synthesis_metrics_on_3d_volumes():
    label = torch.zeros(1, 1, 12, 12, 12, dtype=torch.long)
    label[..., 2:10, 2:10, 2:10] = NORMAL_BRAIN
    label[..., 4:6, 4:6, 4:6] = TUMOR  # 8 voxels
    target = torch.full((1, 1, 12, 12, 12), 80.0, dtype=torch.float64)
    pred = target.clone()
    pred[..., 4, 4:6, 4:6] += 20  # 4 of 8 tumour voxels wrong
    metrics = SynthesisMetrics(("t1w",))
    metrics.update(from_uint8(pred), from_uint8(target), label)
    assert metrics.aggregate().loc["T1w", "Tumor"] == pytest.approx(50.0)


def test_synthesis_metrics_reject_bad_input():
    metrics = SynthesisMetrics(("t1w", "t2w"))
    images = torch.zeros(1, 2, SIZE, SIZE)
    label = torch.ones(1, 1, SIZE, SIZE)
    with pytest.raises(ValueError, match="3 channels"):
        metrics.update(torch.zeros(1, 3, SIZE, SIZE), torch.zeros(1, 3, SIZE, SIZE), label)
    with pytest.raises(ValueError, match="differs"):
        metrics.update(images, torch.zeros(1, 2, SIZE, SIZE + 1), label)
    nan_images = images.clone()
    nan_images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        metrics.update(nan_images, images, label)
    with pytest.raises(ValueError, match="labels"):
        metrics.update(images, images, label * 7)
    with pytest.raises(ValueError, match="label shape"):
        metrics.update(images, images, torch.ones(1, 1, SIZE, 3))


# ---------------------------------------------------------------------------------------------
# Segmentation metrics
# ---------------------------------------------------------------------------------------------


def square_masks(
    shift: tuple[int, int], size: int = 4, grid: int = 20, value: int = EDEMA
) -> tuple[torch.Tensor, torch.Tensor]:
    pred = torch.full((1, 1, grid, grid), NORMAL_BRAIN)
    target = pred.clone()
    pred[0, 0, 2 : 2 + size, 2 : 2 + size] = value
    target[0, 0, 2 + shift[0] : 2 + shift[0] + size, 2 + shift[1] : 2 + shift[1] + size] = value
    return pred, target


def test_dice_sensitivity_specificity_on_hand_made_masks():
    pred, target = square_masks((0, 2))  # 16 pixels each, 8 overlapping, on 400 pixels
    metrics = SegmentationMetrics()
    metrics.update(pred, target)
    table = metrics.aggregate()
    assert list(table.columns) == ["Dice", "HD95", "Sensitivity", "Specificity", "Cases"]
    assert list(table.index) == ["edema", "cavity", "tumor"]
    edema = table.loc["edema"]
    assert edema["Dice"] == pytest.approx(2 * 8 / (16 + 16))
    assert edema["Sensitivity"] == pytest.approx(8 / 16)
    assert edema["Specificity"] == pytest.approx((384 - 8) / 384)
    assert edema["Cases"] == 1


def test_hd95_of_two_squares_at_a_known_offset():
    pred, target = square_masks((0, 3), size=10, grid=24)
    metrics = SegmentationMetrics(classes={"edema": EDEMA})
    metrics.update(pred, target)
    assert metrics.aggregate().loc["edema", "HD95"] == pytest.approx(3.0)

    in_mm = SegmentationMetrics(classes={"edema": EDEMA}, spacing=(1.0, 2.5))
    in_mm.update(pred, target)
    assert in_mm.aggregate().loc["edema", "HD95"] == pytest.approx(7.5)
    assert in_mm.aggregate().attrs["hd95_unit"] == "mm"


def test_one_hot_input_gives_the_same_numbers_as_label_maps():
    pred, target = square_masks((1, 2))
    from_labels = SegmentationMetrics()
    from_labels.update(pred, target)
    one_hot = SegmentationMetrics()

    def to_one_hot(label_map: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(label_map[:, 0].long(), 5).permute(0, 3, 1, 2).float()

    one_hot.update(to_one_hot(pred), to_one_hot(target))
    pd.testing.assert_frame_equal(from_labels.aggregate(), one_hot.aggregate())
    with pytest.raises(ValueError, match="one-hot channels"):
        one_hot.update(to_one_hot(pred)[:, :3], to_one_hot(target)[:, :3])


def test_empty_classes_are_nan_and_missed_classes_score_zero():
    pred, target = square_masks((0, 0))
    target[0, 0, 15:18, 15:18] = TUMOR  # tumour in the truth, never predicted
    metrics = SegmentationMetrics(empty_prediction_hd95=99.0)
    metrics.update(pred, target)
    table = metrics.aggregate()
    assert table.loc["edema", "Dice"] == pytest.approx(1.0) and table.loc["edema", "HD95"] == pytest.approx(
        0.0
    )
    assert table.loc["tumor", "Dice"] == 0.0 and table.loc["tumor", "Sensitivity"] == 0.0
    assert table.loc["tumor", "HD95"] == 99.0
    cavity = table.loc["cavity"]
    assert math.isnan(cavity["Dice"]) and math.isnan(cavity["HD95"]) and math.isnan(cavity["Sensitivity"])
    assert cavity["Specificity"] == 1.0 and cavity["Cases"] == 0
    notes = " ".join(table.attrs["notes"])
    assert "cavity: absent" in notes and "tumor: missed" in notes


def test_regions_and_mean_over_cases():
    first = square_masks((0, 2))  # Dice 0.5
    second = square_masks((0, 0))  # Dice 1.0
    metrics = SegmentationMetrics(classes={"lesion": (EDEMA, CAVITY, TUMOR)})
    metrics.update(torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]]))
    assert metrics.aggregate().loc["lesion", "Dice"] == pytest.approx(0.75)
    assert len(metrics.per_case()) == 2


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def small_table(shift: float) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "Edema": [70.0 + shift, 80.0 + shift],
            "Cavity": [float("nan"), 60.0],
            "Tumor": [50.25, 40.0],
            "SSIM": [0.81234, 0.8],
            "PSNR": [21.04, float("inf")],
        },
        index=["T1w", "FLAIR"],
    )
    table.loc[AVERAGE_ROW] = table.mean()
    table.index.name = "Sequence"
    return table


def test_write_table_csv_and_markdown_layout(tmp_path):
    paths = write_table(small_table(0.0), tmp_path, "table1", caption="Synthesis quality")
    csv = pd.read_csv(paths["csv"], index_col=0)
    assert list(csv.columns) == ["Edema", "Cavity", "Tumor", "SSIM", "PSNR"]
    assert list(csv.index) == ["T1w", "FLAIR", AVERAGE_ROW]
    assert csv.loc["T1w", "SSIM"] == pytest.approx(0.81234)
    assert math.isnan(csv.loc["T1w", "Cavity"])
    lines = paths["markdown"].read_text().splitlines()
    assert lines == [
        "**Synthesis quality**",
        "",
        "| Sequence | Edema | Cavity | Tumor | SSIM | PSNR |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        "| T1w | 70.0 | n/a | 50.2 | 0.812 | 21.0 |",
        "| FLAIR | 80.0 | 60.0 | 40.0 | 0.800 | inf |",
        "| Avg. | 75.0 | 60.0 | 45.1 | 0.806 | inf |",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table1.csv", "table1.md"]


def test_comparison_table_puts_methods_side_by_side(tmp_path):
    tables = {"SAMR": small_table(0.0), "CG-SAMR": small_table(5.0)}
    combined = comparison_table(tables)
    assert combined.columns.nlevels == 2
    assert combined[("CG-SAMR", "Edema")].tolist() == pytest.approx([75.0, 85.0, 80.0])
    paths = write_comparison_table(tables, tmp_path, "table1_compare")
    csv = pd.read_csv(paths["csv"], header=[0, 1], index_col=0)
    assert list(csv.columns.get_level_values(0).unique()) == ["SAMR", "CG-SAMR"]
    assert csv[("SAMR", "Tumor")].tolist() == pytest.approx([50.25, 40.0, 45.125])
    lines = paths["markdown"].read_text().splitlines()
    assert lines[0] == "|  | SAMR |  |  |  |  | CG-SAMR |  |  |  |  |"
    assert (
        lines[2]
        == "| **Sequence** | "
        + " | ".join(["**Edema**", "**Cavity**", "**Tumor**", "**SSIM**", "**PSNR**"] * 2)
        + " |"
    )
    assert lines[3].startswith("| T1w | 70.0 | n/a | 50.2 | 0.812 | 21.0 | 75.0 |")
    assert len(lines) == 3 + 3

    with pytest.raises(ValueError, match="different rows"):
        comparison_table({"A": small_table(0.0), "B": small_table(0.0).iloc[:2]})


def test_single_method_header_and_segmentation_table_markdown(tmp_path):
    paths = write_table(small_table(0.0), tmp_path, "one", method="CG-SAMR")
    assert paths["markdown"].read_text().splitlines()[0] == "|  | CG-SAMR |  |  |  |  |"
    pred, target = square_masks((0, 2))
    metrics = SegmentationMetrics(classes={"edema": EDEMA})
    metrics.update(pred, target)
    lines = to_markdown(metrics.aggregate()).splitlines()
    assert lines[0] == "| Class | Dice | HD95 | Sensitivity | Specificity | Cases |"
    assert lines[2].startswith("| edema | 0.500 | 2.00 | 0.500 | 0.979 | 1 |")


def test_binary_dice_known_answers():
    from medsynth.metrics import binary_dice

    a = np.zeros((5, 5, 3), dtype=bool)
    a[1:3, 1:3] = True  # 12 voxels
    b = np.zeros((5, 5, 3), dtype=np.float32)
    b[1:4, 1:3] = 1.0  # 18 voxels, 12 shared with a
    assert binary_dice(a, b) == pytest.approx(2 * 12 / (12 + 18))
    assert binary_dice(a, a) == pytest.approx(1.0)
    assert binary_dice(a, ~a) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        binary_dice(a, b[:4])


def test_brain_masked_metrics_known_answers_and_whole_image_ssim_is_monais():
    from monai.metrics import SSIMMetric

    label = torch.as_tensor(labelled_slice())[None, None]
    brain = torch.zeros(1, 1, SIZE, SIZE)
    brain[..., 4:8, 4:12] = 1  # 32 brain pixels, half of them inside the SSIM map's valid region
    target = np.zeros((SIZE, SIZE))
    pred = target.copy()
    pred[4:12, 4:12] = 10.0  # 10 grey levels off inside the brain, exact outside
    pred[0:2, :] = 40.0  # large errors outside the brain only
    metrics = SynthesisMetrics(("t1w",))
    metrics.update(from_uint8(pred)[None, None], from_uint8(target)[None, None], label, brain, ["p1"])
    table = metrics.aggregate()
    assert list(table.columns) == ["Edema", "Cavity", "Tumor", "SSIM", "PSNR", *BRAIN_COLUMNS]
    assert table.loc["T1w", "MAE brain"] == pytest.approx(10.0, abs=1e-3)
    assert table.loc["T1w", "PSNR brain"] == pytest.approx(
        20 * math.log10(255) - 10 * math.log10(100.0), abs=1e-3
    )
    whole_mse = (64 * 100 + 32 * 1600) / SIZE**2
    assert table.loc["T1w", "PSNR"] == pytest.approx(
        20 * math.log10(255) - 10 * math.log10(whole_mse), abs=1e-3
    )
    # Whole-image SSIM is MONAI's SSIMMetric (same window, data range 255).
    reference = SSIMMetric(spatial_dims=2, data_range=255.0, win_size=11)
    expected = reference(
        torch.as_tensor(pred)[None, None].double(), torch.as_tensor(target)[None, None].double()
    )
    assert table.loc["T1w", "SSIM"] == pytest.approx(float(expected), abs=1e-5)
    assert table.loc["T1w", "SSIM brain"] != pytest.approx(table.loc["T1w", "SSIM"], abs=1e-3)


def test_per_case_rows_recompute_the_table():
    from medsynth.metrics import table_from_cases

    rng = np.random.default_rng(0)
    metrics = SynthesisMetrics(("t1w", "flair"))
    for batch, cases in enumerate((["a", "a", "b"], ["b", "c"])):
        size = len(cases)
        label = torch.as_tensor(np.stack([labelled_slice()] * size))[:, None]
        brain = (label > 0).float()
        target = torch.rand(size, 2, SIZE, SIZE, generator=torch.Generator().manual_seed(batch)) * 2 - 1
        pred = (target + torch.as_tensor(rng.normal(0, 0.1, target.shape), dtype=torch.float32)).clamp(-1, 1)
        metrics.update(pred, target, label, brain, cases)
    table, cases = metrics.aggregate(), metrics.per_case()
    assert sorted(cases["case"].unique()) == ["a", "b", "c"] and len(cases) == 6
    assert cases.groupby("case")["slices"].first().to_dict() == {"a": 2, "b": 2, "c": 1}
    recomputed = table_from_cases(cases, ("t1w", "flair"), ["Edema", "Cavity", "Tumor"])
    pd.testing.assert_frame_equal(recomputed, table, check_exact=False, rtol=1e-9)
    # A subset of cases is a table of its own (what a bootstrap resamples).
    only_c = table_from_cases(cases[cases["case"] == "c"], ("t1w", "flair"), ["Edema", "Cavity", "Tumor"])
    assert only_c.attrs["cases"] == 1 and not np.allclose(only_c["SSIM"], table["SSIM"])
    with pytest.raises(ValueError, match="every batch or with none"):
        metrics.update(pred, target, label)

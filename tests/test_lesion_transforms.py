"""Lesion-mask manipulations: invariants, achieved sizes, determinism, errors, array/dict/2D/3D."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medsynth.constants import (
    BACKGROUND,
    BRATS_SEG_TO_LABEL,
    CAVITY,
    EDEMA,
    LESION_LABELS,
    NORMAL_BRAIN,
    TUMOR,
)
from medsynth.transforms.lesion import (
    INFO_META_KEY,
    MANIPULATIONS,
    LesionManipulation,
    LesionManipulationd,
    ManipulationNotPossibleError,
    MirrorLesion,
    MirrorLesiond,
    RandLesionManipulation,
    RandLesionManipulationd,
    RandMirrorLesion,
    RandResizeTumor,
    RandResizeTumord,
    RandTransplantLesion,
    RandTransplantLesiond,
    ResizeTumor,
    ResizeTumord,
    TransplantLesion,
    TransplantLesiond,
)

SHAPE_2D = (64, 56)
SHAPE_3D = (40, 36, 28)


def phantom(
    shape: tuple[int, ...],
    centre: tuple[float, ...],
    edema_radius: float,
    tumor_radius: float,
    cavity_radius: float = 0.0,
) -> np.ndarray:
    """Brain ellipsoid symmetric about the array centre, with a spherical lesion (edema shell,
    tumour, cavity at the core)."""
    grid = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    brain = sum(((g - (n - 1) / 2) / (0.45 * n)) ** 2 for g, n in zip(grid, shape, strict=True)) <= 1
    radius = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
    label = np.where(brain, NORMAL_BRAIN, BACKGROUND).astype(np.int64)
    label[brain & (radius <= edema_radius)] = EDEMA
    label[brain & (radius <= tumor_radius)] = TUMOR
    label[brain & (radius <= cavity_radius)] = CAVITY
    return label


def lesion_2d(centre=(16, 26), edema=10.0, tumor=6.0, cavity=2.0) -> np.ndarray:
    return phantom(SHAPE_2D, centre, edema, tumor, cavity)


def lesion_3d(centre=(12, 18, 14), edema=7.0, tumor=4.5, cavity=1.5) -> np.ndarray:
    return phantom(SHAPE_3D, centre, edema, tumor, cavity)


def lesion_of(label: np.ndarray) -> np.ndarray:
    return np.isin(label, LESION_LABELS)


def assert_label_invariants(before: np.ndarray, after: np.ndarray, brain: np.ndarray | None = None) -> None:
    brain = before > 0 if brain is None else brain
    assert after.shape == before.shape
    assert set(np.unique(after).tolist()) <= {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(after[~brain], before[~brain])  # outside the brain: untouched
    assert not (lesion_of(after) & ~brain).any()  # the lesion (so tumour and cavity) inside the brain
    assert not ((after == BACKGROUND) & brain & (before != BACKGROUND)).any()


CASES = [pytest.param(lesion_2d, id="2d"), pytest.param(lesion_3d, id="3d")]


# ---------------------------------------------------------------------------------------------
# ResizeTumor
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", CASES)
@pytest.mark.parametrize("percent", [100.0, -50.0])
def test_resize_reaches_the_requested_size_and_keeps_invariants(make, percent):
    label = make()
    out, info = ResizeTumor(percent, return_info=True)(label)
    before, after = np.count_nonzero(label == TUMOR), np.count_nonzero(out == TUMOR)
    requested = 1 + percent / 100
    assert after / before == pytest.approx(requested, rel=0.02)
    assert info["achieved_ratio"] == pytest.approx(after / before)
    assert info["requested_ratio"] == requested and info["original_voxels"] == before
    assert_label_invariants(label, out)
    np.testing.assert_array_equal(out == CAVITY, label == CAVITY)  # the cavity is never touched
    if percent > 0:
        # The tumour fits in the edema: growth converts edema only, the envelope is unchanged.
        grown = (out == TUMOR) & (label != TUMOR)
        assert grown.any() and (label[grown] == EDEMA).all()
        np.testing.assert_array_equal(lesion_of(out), lesion_of(label))
        assert info["lesion_growth_voxels"] == 0
    else:
        shrunk = (label == TUMOR) & (out != TUMOR)
        assert not ((out == TUMOR) & (label != TUMOR)).any()
        assert (out[shrunk] == EDEMA).all()
        np.testing.assert_array_equal(lesion_of(out), lesion_of(label))


def test_growth_beyond_the_lesion_extends_the_envelope_inside_the_brain():
    label = lesion_2d(edema=7.0, tumor=6.0, cavity=-1.0)  # thin edema shell
    out, info = ResizeTumor(100.0, return_info=True)(label)
    assert np.count_nonzero(out == TUMOR) == 2 * np.count_nonzero(label == TUMOR)
    assert info["lesion_growth_voxels"] > 0
    assert (lesion_of(out) >= lesion_of(label)).all()  # old envelope kept
    assert (
        np.count_nonzero(lesion_of(out)) == np.count_nonzero(lesion_of(label)) + info["lesion_growth_voxels"]
    )
    assert not (out == EDEMA).any()  # all the edema was converted before the tumour left the lesion
    assert_label_invariants(label, out)


def test_growth_stays_inside_an_explicit_brain_mask():
    label = lesion_2d(centre=(8, 26), edema=6.0, tumor=5.0, cavity=-1.0)
    brain = label > 0
    brain[:6] = False  # a brain mask cutting closer than the label map ...
    label[~brain] = BACKGROUND  # ... with the lesion inside it
    out = ResizeTumor(200.0)(label, brain.astype(np.uint8))
    assert_label_invariants(label, out, brain)
    assert np.count_nonzero(out == TUMOR) == 3 * np.count_nonzero(label == TUMOR)


def test_resize_impossible_requests_raise_clear_errors():
    no_tumor = lesion_2d(tumor=-1.0, cavity=-1.0)
    with pytest.raises(ManipulationNotPossibleError, match="no tumour"):
        ResizeTumor(100.0)(no_tumor)
    with pytest.raises(ManipulationNotPossibleError, match=">= 100 %"):
        ResizeTumor(-100.0)(lesion_2d())
    tiny = np.zeros((12, 12), dtype=np.int64)
    tiny[2:10, 2:10] = NORMAL_BRAIN  # 64 brain pixels
    tiny[5:8, 5:8] = TUMOR  # 9 tumour pixels cannot grow to 99
    with pytest.raises(ManipulationNotPossibleError, match="at most"):
        ResizeTumor(1000.0)(tiny)
    assert isinstance(ManipulationNotPossibleError("x"), ValueError)


def test_malformed_label_maps_are_rejected():
    label = lesion_2d()
    with pytest.raises(ValueError, match="unknown label value"):
        ResizeTumor(100.0)(np.where(label == EDEMA, 7, label))
    with pytest.raises(ValueError, match="NaN"):
        ResizeTumor(100.0)(np.where(label == EDEMA, np.nan, label.astype(float)))
    with pytest.raises(ValueError, match="single channel"):
        ResizeTumor(100.0)(np.stack([label, label, label, label])[:, None])
    with pytest.raises(ValueError, match="brain mask shape"):
        ResizeTumor(100.0)(label, np.ones((10, 10)))
    with pytest.raises(ValueError, match="outside the brain mask"):
        ResizeTumor(100.0)(label, np.zeros_like(label))


# ---------------------------------------------------------------------------------------------
# MirrorLesion
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", CASES)
def test_mirror_flips_the_lesion_across_the_midline_and_twice_is_identity(make):
    label = make()
    out, info = MirrorLesion(return_info=True)(label)
    # The brain is symmetric about the array centre: the lesion is exactly the flipped lesion.
    np.testing.assert_array_equal(
        np.where(lesion_of(out), out, 0), np.flip(np.where(lesion_of(label), label, 0), axis=0)
    )
    assert info["midline"] == pytest.approx((label.shape[0] - 1) / 2) and info["clipped_fraction"] == 0.0
    assert (out[lesion_of(label) & ~lesion_of(out)] == NORMAL_BRAIN).all()
    assert_label_invariants(label, out)
    np.testing.assert_array_equal(MirrorLesion()(out), label)


def test_mirror_axis_is_configurable():
    label = phantom(SHAPE_2D, (32, 10), 6.0, 4.0)
    out = MirrorLesion(axis=1)(label)
    np.testing.assert_array_equal(out, np.flip(label, axis=1))


def test_mirror_outside_the_brain_raises_or_is_clipped_within_tolerance():
    label = lesion_2d(centre=(16, 26), edema=8.0, tumor=4.0, cavity=-1.0)
    label[47:60, 10:42] = BACKGROUND  # a hole where the mirror lands (midline 31.5 -> x = 47 +- 8)
    with pytest.raises(ManipulationNotPossibleError, match="outside the brain"):
        MirrorLesion(midline="bounding_box", max_outside_fraction=0.1)(label)
    out, info = MirrorLesion(midline="bounding_box", max_outside_fraction=0.9, return_info=True)(label)
    assert 0.3 < info["clipped_fraction"] < 0.7
    assert info["midline"] == 31.5
    assert_label_invariants(label, out)


def test_midline_methods_and_unknown_method():
    label = lesion_2d()
    _, com = MirrorLesion(midline="center_of_mass", return_info=True)(label)
    _, box = MirrorLesion(midline="bounding_box", return_info=True)(label)
    assert com["midline"] == pytest.approx(box["midline"]) == pytest.approx(31.5)
    with pytest.raises(ValueError, match="midline"):
        MirrorLesion(midline="middle")


# ---------------------------------------------------------------------------------------------
# TransplantLesion
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [SHAPE_2D, SHAPE_3D], ids=["2d", "3d"])
def test_transplant_places_the_donor_lesion_and_removes_the_recipient_lesion(shape):
    recipient = phantom(shape, tuple(0.3 * n for n in shape), 6.0, 4.0, 1.0)
    donor = phantom(shape, tuple(0.6 * n for n in shape), 5.0, 3.0, 2.0)
    out, info = TransplantLesion(donor, return_info=True)(recipient)
    np.testing.assert_array_equal(lesion_of(out), lesion_of(donor))
    np.testing.assert_array_equal(out[lesion_of(donor)], donor[lesion_of(donor)])
    assert (out[lesion_of(recipient) & ~lesion_of(donor)] == NORMAL_BRAIN).all()
    assert (
        info["donor_lesion_voxels"] == np.count_nonzero(lesion_of(donor)) and info["clipped_fraction"] == 0.0
    )
    assert_label_invariants(recipient, out)

    offset = [2] + [-1] * (len(shape) - 1)
    shifted = TransplantLesion(donor, offset=offset)(recipient)
    expected = np.roll(lesion_of(donor), offset, axis=tuple(range(len(shape))))
    np.testing.assert_array_equal(lesion_of(shifted), expected)


def test_transplant_errors():
    recipient = lesion_2d()
    with pytest.raises(ManipulationNotPossibleError, match="donor label map has no lesion"):
        TransplantLesion(lesion_2d(edema=-1, tumor=-1, cavity=-1))(recipient)
    with pytest.raises(ManipulationNotPossibleError, match="outside the brain"):
        TransplantLesion(lesion_2d(), offset=(-20, 0))(recipient)
    with pytest.raises(ValueError, match="no donor"):
        TransplantLesion()(recipient)
    with pytest.raises(ValueError, match="neither 2D"):
        TransplantLesion(lesion_3d(), spatial_dims=2)(recipient)


# ---------------------------------------------------------------------------------------------
# Types, layouts and metadata
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda x: x, id="numpy"),
        pytest.param(lambda x: x[None].astype(np.uint8), id="numpy-channel"),
        pytest.param(lambda x: torch.as_tensor(x), id="torch"),
        pytest.param(lambda x: torch.as_tensor(x[None], dtype=torch.float32), id="torch-channel-float"),
    ],
)
@pytest.mark.parametrize("make", CASES)
def test_numpy_and_torch_with_and_without_channel_give_the_same_result(wrap, make):
    label = make()
    reference = ResizeTumor(100.0)(label)
    data = wrap(label)
    out = ResizeTumor(100.0)(data)
    assert type(out) is type(data) and out.shape == data.shape and out.dtype == data.dtype
    np.testing.assert_array_equal(np.asarray(out).reshape(label.shape), reference)


def test_metatensor_output_records_the_manipulations_without_touching_the_input():
    label = MetaTensor(
        torch.as_tensor(lesion_3d()[None], dtype=torch.float32), meta={"filename_or_obj": "case.nii.gz"}
    )
    out = MirrorLesion()(ResizeTumor(-50.0)(label))
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "case.nii.gz"
    assert [i["operation"] for i in out.meta[INFO_META_KEY]] == ["resize_tumor", "mirror_lesion"]
    assert INFO_META_KEY not in label.meta


def test_dictionary_wrappers_change_only_their_keys():
    label, donor = lesion_2d(), lesion_2d(centre=(40, 30))
    image = np.random.default_rng(0).random(SHAPE_2D)
    brain = (label > 0).astype(np.uint8)
    data = {"label": label, "image": image, "brain": brain, "donor": donor}
    for transform in (
        MirrorLesiond("label", brain_mask_key="brain"),
        ResizeTumord("label", percent=100.0),
        TransplantLesiond("label", donor_key="donor"),
    ):
        out = transform(data)
        assert out["image"] is image and out["brain"] is brain and out["donor"] is donor
        assert out["label"] is not label and not np.array_equal(out["label"], label)
        assert out["label_manipulation"]["applied"] is True
    np.testing.assert_array_equal(data["label"], lesion_2d())  # the input dict is not modified
    assert "label_manipulation" not in data
    with pytest.raises(ValueError, match="exactly one"):
        TransplantLesiond("label")
    loaded = MetaTensor(
        torch.as_tensor(lesion_2d(tumor=-1.0, cavity=-1.0)[None]), meta={"filename_or_obj": "p7_seg.nii.gz"}
    )
    with pytest.raises(
        ManipulationNotPossibleError, match=r"key 'label', file p7_seg.nii.gz: resize tumour: .*no tumour"
    ):
        ResizeTumord("label", percent=100.0)({"label": loaded})


# ---------------------------------------------------------------------------------------------
# Random variants
# ---------------------------------------------------------------------------------------------


def run_seeded(transform, label, seed: int, n: int = 4):
    transform.set_random_state(seed)
    return [transform(label) for _ in range(n)]


def test_random_variants_are_reproducible_for_a_seed():
    label = lesion_2d()
    donors = [lesion_2d(centre=(40, 30), edema=6, tumor=4), lesion_2d(centre=(20, 20), edema=5, tumor=3)]
    for transform in (
        RandMirrorLesion(prob=0.5),
        RandResizeTumor((-50.0, 100.0)),
        RandTransplantLesion(donors),
        RandLesionManipulation(mirror_prob=0.5, resize_prob=0.8, transplant_prob=0.5, donors=donors),
    ):
        first, again, other = (
            run_seeded(transform, label, 7),
            run_seeded(transform, label, 7),
            run_seeded(transform, label, 8),
        )
        for a, b in zip(first, again, strict=True):
            np.testing.assert_array_equal(a, b)
        assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True)), type(
            transform
        ).__name__
        for out in first:
            assert_label_invariants(label, out)


def test_random_resize_samples_the_range_and_reports_it():
    transform = RandResizeTumor((-50.0, 100.0), return_info=True).set_random_state(0)
    label = lesion_3d()
    percents = []
    for _ in range(5):
        _, info = transform(label)
        percents.append(info["requested_percent"])
        assert info["achieved_ratio"] == pytest.approx(1 + info["requested_percent"] / 100, rel=0.02)
    assert all(-50.0 <= p <= 100.0 for p in percents) and len(set(percents)) == 5
    with pytest.raises(ValueError, match="percent_range"):
        RandResizeTumor((-120.0, 0.0))


def test_random_transplant_places_a_donor_lesion_somewhere_in_the_brain():
    label = lesion_3d()
    donor = lesion_3d(centre=(28, 20, 14), edema=5.0, tumor=3.0, cavity=-1.0)
    transform = RandTransplantLesion(
        [donor], random_location=True, max_outside_fraction=0.0, return_info=True
    )
    transform.set_random_state(3)
    offsets = set()
    for _ in range(4):
        out, info = transform(label)
        assert info["clipped_fraction"] == 0.0 and info["donor_index"] == 0
        assert np.count_nonzero(lesion_of(out)) == np.count_nonzero(lesion_of(donor))
        moved = np.roll(lesion_of(donor), info["offset"], axis=(0, 1, 2))
        np.testing.assert_array_equal(lesion_of(out), moved)
        assert_label_invariants(label, out)
        offsets.add(tuple(info["offset"]))
    assert len(offsets) > 1
    with pytest.raises(ValueError, match="no lesion"):
        RandTransplantLesion([lesion_3d(edema=-1, tumor=-1, cavity=-1)])


def test_combination_skips_impossible_steps_unless_told_not_to():
    no_tumor = lesion_2d(tumor=-1.0, cavity=-1.0)
    lenient = RandLesionManipulation(mirror_prob=1.0, resize_prob=1.0, return_info=True).set_random_state(0)
    out, infos = lenient(no_tumor)
    assert [i["applied"] for i in infos] == [True, False]
    assert infos[1]["operation"] == "resize_tumor" and "no tumour" in infos[1]["reason"]
    np.testing.assert_array_equal(out, MirrorLesion()(no_tumor))
    strict = RandLesionManipulation(mirror_prob=0.0, resize_prob=1.0, skip_impossible=False).set_random_state(
        0
    )
    with pytest.raises(ManipulationNotPossibleError):
        strict(no_tumor)
    with pytest.raises(ValueError, match="donors"):
        RandLesionManipulation(transplant_prob=0.5)


def test_random_dictionary_wrappers_use_the_same_draw_for_every_key():
    label = lesion_2d()
    donors = [lesion_2d(centre=(40, 30), edema=6, tumor=4)]
    image = np.zeros(SHAPE_2D)
    for transform in (
        RandResizeTumord(["label", "copy"]),
        RandTransplantLesiond(["label", "copy"], donors=donors),
        RandLesionManipulationd(["label", "copy"], mirror_prob=0.5, resize_prob=1.0),
    ):
        transform.set_random_state(5)
        first = transform({"label": label, "copy": label.copy(), "image": image})
        np.testing.assert_array_equal(first["label"], first["copy"])
        assert first["image"] is image and "label_manipulation" in first and "copy_manipulation" in first
        transform.set_random_state(5)
        again = transform({"label": label, "copy": label.copy(), "image": image})
        np.testing.assert_array_equal(first["label"], again["label"])


def test_infos_of_applied_and_skipped_manipulations_collate_in_a_dataloader():
    from monai.data import DataLoader, Dataset

    labels = [lesion_2d(), lesion_2d(tumor=-1.0, cavity=-1.0)]
    items = [{"label": MetaTensor(torch.as_tensor(label[None]))} for label in labels]
    transform = RandLesionManipulationd("label", mirror_prob=0.5, resize_prob=1.0)
    transform.set_random_state(0)
    batch = next(iter(DataLoader(Dataset(items, transform=transform), batch_size=2)))
    mirror, resize = batch["label_manipulation"]
    assert resize["applied"].tolist() == [True, False]
    assert resize["achieved_ratio"][0] == pytest.approx(
        1 + float(resize["requested_percent"][0]) / 100, rel=0.02
    )
    assert "no tumour" in resize["reason"][1] and mirror["operation"] == ["mirror_lesion"] * 2
    # The MetaTensor meta records skipped steps too, so it collates as well.
    in_meta = batch["label"].meta[INFO_META_KEY]
    assert [step["operation"] for step in in_meta] == [["mirror_lesion"] * 2, ["resize_tumor"] * 2]
    assert in_meta[1]["applied"].tolist() == [True, False]
    assert INFO_META_KEY not in items[1]["label"].meta


# ---------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------


def brats_label(case_dir) -> np.ndarray:
    import nibabel as nib

    case = case_dir.name
    seg = np.asarray(nib.load(case_dir / f"{case}_seg.nii.gz").dataobj).astype(np.int16)
    brain = np.asarray(nib.load(case_dir / f"{case}_t1.nii.gz").dataobj) != 0
    brain |= np.asarray(nib.load(case_dir / f"{case}_flair.nii.gz").dataobj) != 0
    label = np.zeros(seg.shape, dtype=np.int16)
    for seg_value, value in BRATS_SEG_TO_LABEL.items():
        label[brain & (seg == seg_value)] = value
    label[(seg > 0) & ~brain] = EDEMA  # a few annotated voxels where the image is 0: keep them lesion
    return label


@pytest.mark.realdata
def test_resize_and_mirror_on_a_real_brats_lesion(brats_dir):
    label = brats_label(brats_dir / "Brats18_TCIA02_606_1")
    # Crop to the brain's bounding box: same result, a fraction of the work.
    box = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(label))
    label = label[box]
    for percent in (100.0, -50.0):
        out, info = ResizeTumor(percent, return_info=True)(label)
        assert info["achieved_ratio"] == pytest.approx(1 + percent / 100, rel=0.02)
        assert_label_invariants(label, out)
    out, info = MirrorLesion(return_info=True)(label)
    assert info["clipped_fraction"] < 0.25
    assert_label_invariants(label, out)


def test_named_manipulation_matches_the_transform_it_names():
    label = lesion_2d()
    brain = label > 0
    for name, expected in (
        ("mirror", MirrorLesion(return_info=True)(label, brain)),
        ("grow", ResizeTumor(100.0, return_info=True)(label, brain)),
        ("shrink", ResizeTumor(-50.0, return_info=True)(label, brain)),
    ):
        result, info = LesionManipulation(name, return_info=True)(label, brain)
        np.testing.assert_array_equal(result, expected[0])
        assert info == expected[1]
    unchanged, info = LesionManipulation("none", return_info=True)(label)
    assert unchanged is label and info == {"operation": "none"}
    donor = np.roll(label, 3, axis=0)
    transplanted = LesionManipulation("transplant")(label, brain, donor=donor)
    np.testing.assert_array_equal(transplanted, TransplantLesion(donor)(label, brain))
    # "random" is re-seeded at every call: the same case gets the same draws whatever came before.
    random = LesionManipulation("random", seed=3)
    first = random(label, brain, donor=donor)
    random(np.flip(label, 0).copy(), brain)
    np.testing.assert_array_equal(random(label, brain, donor=donor), first)
    others = [
        LesionManipulation("random", seed=seed)(label, brain, donor=donor) for seed in range(6) if seed != 3
    ]
    assert any(not np.array_equal(other, first) for other in others)  # the seed matters
    with pytest.raises(ValueError, match="needs a donor"):
        LesionManipulation("transplant")(label, brain)
    with pytest.raises(ValueError, match="unknown manipulation"):
        LesionManipulation("flip")
    assert MANIPULATIONS == ("none", "mirror", "grow", "shrink", "transplant", "random")
    d = LesionManipulationd("label", "grow", brain_mask_key="brain", donor_key="donor")(
        {"label": label, "brain": brain, "donor": ""}
    )
    np.testing.assert_array_equal(d["label"], ResizeTumor(100.0)(label, brain))
    assert d["label_manipulation"]["operation"] == "resize_tumor"

"""The 2D-instance dataset: item contract, orientation, slice selection, caching modes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from cohort_helpers import LPS_AFFINE, TINY_SHAPE, write_tiny_cohort

from medsynth.data.dataset import make_slice_dataset
from medsynth.data.manifest import read_manifest
from medsynth.transforms.intensity import unit_to_intensity

SIZE = 32


@pytest.fixture(scope="module")
def lps_cohort(tmp_path_factory):
    """Four tiny patients stored in L-P-S orientation (like BraTS), so the dataset must reorient them."""
    return read_manifest(write_tiny_cohort(tmp_path_factory.mktemp("lps") / "cohort", 4, affine=LPS_AFFINE))


def _ras_padded(path: str, size: int = SIZE) -> np.ndarray:
    """Reference: RAS-reoriented volume, centre-padded to ``size`` (independent of MONAI)."""
    data = np.asanyarray(nib.as_closest_canonical(nib.load(path)).dataobj).astype(np.float64)
    out = np.zeros((size, size, data.shape[2]))
    x0, y0 = (size - data.shape[0]) // 2, (size - data.shape[1]) // 2
    out[x0 : x0 + data.shape[0], y0 : y0 + data.shape[1]] = data
    return out


def test_item_contract(lps_cohort):
    dataset = make_slice_dataset(
        lps_cohort, ["train", "val", "test"], image_size=SIZE, slice_selection="all", progress=False
    )
    assert len(dataset) == 4 * TINY_SHAPE[2]
    item = dataset[3]
    n = 5
    expected = {
        "image": ((n, SIZE, SIZE), torch.float32),
        "mask": ((5, SIZE, SIZE), torch.float32),
        "atlas": ((3 * n, SIZE, SIZE), torch.float32),
        "label": ((1, SIZE, SIZE), torch.int64),
        "brain_mask": ((1, SIZE, SIZE), torch.float32),
        "window": ((n, 2), torch.float32),
    }
    for key, (shape, dtype) in expected.items():
        assert tuple(item[key].shape) == shape, key
        assert item[key].dtype == dtype, key
    assert isinstance(item["patient_id"], str) and isinstance(item["slice_index"], int)
    assert (item["patient_id"], item["slice_index"]) == ("P000", 3)

    # One-hot mask: sums to 1 everywhere and agrees with the label map.
    torch.testing.assert_close(item["mask"].sum(0), torch.ones(SIZE, SIZE))
    assert torch.equal(item["mask"].argmax(0), item["label"][0])
    assert torch.equal(item["brain_mask"][0], (item["label"][0] > 0).float())
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["atlas"].min() >= -1 and item["atlas"].max() <= 1

    # Orientation and padding: the label is the RAS-reoriented file, centre-padded.
    row = lps_cohort.iloc[0]
    np.testing.assert_array_equal(item["label"][0].numpy(), _ras_padded(row["label"])[..., 3])
    # Background: anatomical intensity 0 -> -1, APTw 0 % -> 0.
    outside = item["label"][0] == 0
    assert torch.all(item["image"][:4][:, outside] == -1)
    assert torch.all(item["image"][4][outside] == 0)
    # The stored window maps the image back to the file's intensities (inside the window).
    t1w = _ras_padded(row["t1w"])[..., 3]
    restored = unit_to_intensity(item["image"], item["window"])[0].numpy()
    inside = t1w <= float(item["window"][0, 1])
    np.testing.assert_allclose(restored[inside], t1w[inside], rtol=1e-4, atol=1e-2)
    assert item["window"][4].tolist() == [-5.0, 5.0]


def test_atlas_channels_are_neighbouring_slices(lps_cohort):
    dataset = make_slice_dataset(lps_cohort, "train", image_size=SIZE, slice_selection="all", progress=False)
    depth = TINY_SHAPE[2]
    items = [dataset[z] for z in range(depth)]  # the first patient's slices, in order
    assert [it["slice_index"] for it in items] == list(range(depth))
    atlas_window = items[0]["atlas_window"]
    for i, sequence in enumerate(("t1w", "gd_t1w", "t2w", "flair", "aptw")):
        reference = _ras_padded(lps_cohort.iloc[0][f"atlas_{sequence}"])
        lower, upper = atlas_window[i].tolist()
        scaled = np.clip(2 * (reference - lower) / (upper - lower) - 1, -1, 1)
        for z, item in enumerate(items):
            for k in range(3):
                neighbour = min(max(z + k - 1, 0), depth - 1)  # edge slices replicate
                np.testing.assert_allclose(
                    item["atlas"][3 * i + k].numpy(), scaled[..., neighbour], atol=1e-5
                )


def test_slice_selection_modes(lps_cohort):
    common = {"splits": ["train", "val", "test"], "image_size": SIZE, "progress": False}
    brain = make_slice_dataset(lps_cohort, slice_selection="brain", min_brain_fraction=0.05, **common)
    lesion = make_slice_dataset(lps_cohort, slice_selection="lesion", **common)
    # Slice 0 holds no brain; the lesion occupies the two middle slices.
    assert len(brain) == 4 * (TINY_SHAPE[2] - 1)
    assert {brain[i]["slice_index"] for i in range(len(brain))} == set(range(1, TINY_SHAPE[2]))
    assert len(lesion) == 4 * 2
    for i in range(len(lesion)):
        assert lesion[i]["label"].ge(2).any()
    with pytest.raises(ValueError, match="no patient in split"):
        make_slice_dataset(lps_cohort.assign(split="train"), "test", image_size=SIZE, progress=False)


def test_large_planes_are_resized_with_nearest_labels(lps_cohort):
    dataset = make_slice_dataset(lps_cohort, "train", image_size=12, slice_selection="lesion", progress=False)
    item = dataset[0]
    assert item["image"].shape == (5, 12, 12) and item["atlas"].shape == (15, 12, 12)
    torch.testing.assert_close(item["mask"].sum(0), torch.ones(12, 12))
    assert set(item["label"].unique().tolist()) <= {0, 1, 2, 3, 4}
    assert item["label"].ge(2).any()


def test_memory_disk_and_no_cache_give_the_same_items(lps_cohort, tmp_path):
    common = {"splits": ["val", "test"], "image_size": SIZE, "slice_selection": "brain", "progress": False}
    memory = make_slice_dataset(lps_cohort, cache="memory", **common)
    disk = make_slice_dataset(lps_cohort, cache="disk", cache_dir=tmp_path, **common)
    plain = make_slice_dataset(lps_cohort, cache="none", **common)
    assert len(memory) == len(disk) == len(plain) > 0
    for index in range(len(memory)):
        a, b, c = memory[index], disk[index], plain[index]
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]), key
            else:
                assert a[key] == b[key] == c[key], key
    # Patients of val+test, plus the shared atlas once.
    files = sorted(tmp_path.rglob("*.pt"))
    assert len(files) == len(set(disk.patient_ids)) + 1
    # A second dataset reuses the disk cache; another image size gets its own.
    again = make_slice_dataset(lps_cohort, cache="disk", cache_dir=tmp_path, **common)
    assert torch.equal(again[0]["image"], memory[0]["image"])
    assert sorted(tmp_path.rglob("*.pt")) == files
    make_slice_dataset(lps_cohort, cache="disk", cache_dir=tmp_path, **{**common, "image_size": 24})[0]
    assert len(list(tmp_path.glob("volumes_*"))) == 2
    with pytest.raises(ValueError, match="cache_dir"):
        make_slice_dataset(lps_cohort, cache="disk", **common)

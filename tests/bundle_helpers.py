"""Tiny settings of the bundle tests: the tiny phantom of ``conftest.tiny_phantom_cache`` (3 patients
of 40x40x6 voxels, 32x32 slices), narrow networks per method and one epoch of training."""

from __future__ import annotations

TINY_DATA = {"phantom_patients": 3, "phantom_shape": [40, 40, 6], "image_size": 32}
TINY_NETWORKS = {
    "cg_samr": {"base_width": 4, "num_res_blocks": 1},
    "samr": {"base_width": 4, "num_res_blocks": 1},
    "pix2pix": {"pix2pix_ngf": 4, "pix2pix_num_downs": 5},
    "shin": {"pix2pix_ngf": 4, "pix2pix_num_downs": 5},
    "pix2pixhd": {"pix2pixhd_ngf": 4, "num_res_blocks": 1},
}
TINY_TRAINING = {
    "num_epochs": 1,
    "batch_size": 2,
    "d_base_filters": 8,
    "d_num_layers": 2,
    "unet_channels": [4, 8, 16, 32, 64],
    "val_interval": 1,
    "sample_interval": 1,
}

"""The real MONAI Label server of ``medsynth serve`` (skipped where the serving environment is not
installed: ``apps/monailabel/install.sh``; CI builds it and runs this file there): start it on a free
loopback port, ``/info/``, synthesis and segmentation against a direct bundle inference of the same
input, every refusal, CORS; stop it by its PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_SERVED = {"image_size": 32, "base_width": 4, "num_res_blocks": 1, "unet_channels": [4, 8, 16, 32, 64]}
TINY_TRAIN = {"phantom_patients": 3, "phantom_shape": [40, 40, 6], "num_epochs": 1, "batch_size": 2,
              "d_base_filters": 8, "d_num_layers": 2, **TINY_SERVED}  # fmt: skip

monailabel = pytest.importorskip(
    "monailabel", reason="the serving environment is not installed (apps/monailabel/install.sh)"
)
pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Tiny CG-SAMR and lesion_seg runs, a datastore with a label map and a 4D image, and the server."""
    import requests
    from monai.bundle import run

    from medsynth.data.cohort import resolve_cohort
    from medsynth.utils.bundles import bundle_config_files

    os.chdir(REPO)
    root = tmp_path_factory.mktemp("serve")
    cache = root / "cache"
    run(config_file=bundle_config_files("bundles/cg_samr", "train"), output_dir=str(root / "cg_samr"),
        cache_dir=str(cache), **TINY_TRAIN)  # fmt: skip
    run(config_file=bundle_config_files("bundles/lesion_seg", "train"), output_dir=str(root / "lesion_seg"),
        cache_dir=str(cache), **TINY_TRAIN)  # fmt: skip
    manifest = resolve_cohort("", cache, phantom_patients=3, phantom_shape=(40, 40, 6), progress=False)
    patient = manifest.iloc[0]
    studies = root / "studies"
    studies.mkdir()
    label = nib.load(patient["label"])
    nib.save(label, studies / "case1.nii.gz")
    nib.save(nib.load(manifest.iloc[1]["label"]), studies / "case2.nii.gz")  # a transplant's donor
    sequences = ["t1w", "gd_t1w", "t2w", "flair", "aptw"]
    stack = np.stack([nib.load(patient[s]).get_fdata(dtype=np.float32) for s in sequences], axis=-1)
    nib.save(nib.Nifti1Image(stack, label.affine), studies / "mr1.nii.gz")
    (root / "outside.nii.gz").write_bytes((studies / "case1.nii.gz").read_bytes())
    (studies / "leak.nii.gz").symlink_to(root / "outside.nii.gz")
    port = _free_port()
    settings = [f"{k}={json.dumps(v)}" for k, v in TINY_SERVED.items()]
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "medsynth", "serve", "--studies", str(studies), "--port", str(port),
         "--models", str(root / "cg_samr"), f"{root / 'lesion_seg'}=bundles/lesion_seg", "--set", *settings],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if requests.get(f"{url}/info/", timeout=2).ok:
                break
        except requests.ConnectionError:
            time.sleep(1)
        if process.poll() is not None:
            break
    if process.poll() is not None:
        pytest.fail(f"the server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
    yield {
        "url": url,
        "root": root,
        "studies": studies,
        "manifest": manifest,
        "patient": patient,
        "port": port,
    }
    os.killpg(process.pid, signal.SIGTERM)  # stopped by its PID (and its uvicorn child)
    process.wait(timeout=30)
    log.close()


def _direct_synthesis(server, tmp_path, **overrides) -> Path:
    """The same input through the bundle's own inference (no server)."""
    from monai.bundle import run

    from medsynth.utils.bundles import bundle_config_files

    out = tmp_path / "direct"
    run(config_file=bundle_config_files("bundles/cg_samr", "inference"),
        output_dir=str(server["root"] / "cg_samr"),
        mask_file=str(server["studies"] / "case1.nii.gz"), case_name="case", inference_dir=str(out),
        **TINY_SERVED, **overrides)  # fmt: skip
    return out / "case"


def test_info_lists_the_models_sequences_labels_and_parameters(server):
    from medsynth.serving.client import info

    served = info(server["url"])["models"]
    assert served["cg_samr"]["sequences"] == ["t1w", "gd_t1w", "t2w", "flair", "aptw"]
    assert served["cg_samr"]["parameters"]["manipulation"][:3] == ["none", "mirror", "grow"]
    assert served["lesion_seg"]["type"] == "segmentation" and served["lesion_seg"]["labels"]["tumor"] == 4
    log = (server["root"] / "server.log").read_text()
    assert f"http://127.0.0.1:{server['port']} (loopback only)" in log


@pytest.mark.parametrize("manipulation", ["none", "mirror"])
def test_synthesis_answers_what_the_bundle_writes(server, tmp_path, manipulation):
    from medsynth.serving.client import synthesize

    written = synthesize(server["url"], "cg_samr", server["studies"] / "case1.nii.gz", tmp_path / "served",
                         {"manipulation": manipulation, "seed": 1})  # fmt: skip
    sequences = ["t1w", "gd_t1w", "t2w", "flair", "aptw"]
    assert sorted(p.name for p in written) == sorted(
        [f"{s}.nii.gz" for s in sequences] + [f"confidence_{s}.nii.gz" for s in sequences]
        + ["label.nii.gz", "brain_mask.nii.gz", "synthesis.json"])  # fmt: skip
    direct = _direct_synthesis(server, tmp_path, manipulation=manipulation, seed=1, with_confidence=True)
    confidence = nib.load(tmp_path / "served" / "confidence_flair.nii.gz").get_fdata()
    assert 0 <= confidence.min() and confidence.max() <= 1  # CG-SAMR's maps, on the input grid
    source = nib.load(server["studies"] / "case1.nii.gz")
    for name in ("t1w.nii.gz", "aptw.nii.gz", "label.nii.gz", "confidence_flair.nii.gz"):
        served, expected = nib.load(tmp_path / "served" / name), nib.load(direct / name)
        assert served.shape == source.shape
        np.testing.assert_allclose(served.affine, source.affine, atol=1e-5)
        np.testing.assert_allclose(served.get_fdata(), expected.get_fdata(), rtol=1e-5, atol=1e-5)
    changed = not np.array_equal(
        nib.load(tmp_path / "served" / "label.nii.gz").get_fdata(), source.get_fdata()
    )
    assert changed == (manipulation == "mirror")


def test_a_transplant_takes_its_donor_from_the_datastore(server, tmp_path):
    from medsynth.serving.client import synthesize

    written = synthesize(server["url"], "cg_samr", server["studies"] / "case1.nii.gz", tmp_path / "served",
                         {"manipulation": "transplant", "donor": "case2"})  # fmt: skip
    record = json.loads(next(p for p in written if p.name == "synthesis.json").read_text())
    assert record["manipulation_info"]["operation"] == "transplant_lesion"
    label = nib.load(tmp_path / "served" / "label.nii.gz").get_fdata()
    assert not np.array_equal(label, nib.load(server["studies"] / "case1.nii.gz").get_fdata())


def test_one_sequence_by_datastore_id(server, tmp_path):
    import requests

    response = requests.post(f"{server['url']}/infer/cg_samr", params={"image": "case1", "output": "image"},
                             data={"params": json.dumps({"sequence": "flair"})}, timeout=300)  # fmt: skip
    assert response.status_code == 200
    (tmp_path / "flair.nii.gz").write_bytes(response.content)
    flair = nib.load(tmp_path / "flair.nii.gz")
    assert flair.shape == nib.load(server["studies"] / "case1.nii.gz").shape
    assert np.isfinite(flair.get_fdata()).all() and flair.get_fdata().max() > 0


def test_segmentation_answers_a_label_map_like_the_bundles(server, tmp_path):
    from monai.bundle import run

    from medsynth.serving.client import segment
    from medsynth.utils.bundles import bundle_config_files

    segment(server["url"], "lesion_seg", server["studies"] / "mr1.nii.gz", tmp_path / "seg.nii.gz")
    served = nib.load(tmp_path / "seg.nii.gz")
    run(config_file=bundle_config_files("bundles/lesion_seg", "inference"),
        output_dir=str(server["root"] / "lesion_seg"), cache_dir=str(server["root"] / "cache"),
        inference_dir=str(tmp_path / "direct"), **TINY_TRAIN)  # fmt: skip
    expected = nib.load(tmp_path / "direct" / server["patient"]["patient_id"] / "lesion_seg.nii.gz")
    assert served.shape == expected.shape and set(np.unique(served.get_fdata())) <= {0, 1, 2, 3, 4}
    np.testing.assert_allclose(served.affine, expected.affine, atol=1e-5)
    np.testing.assert_array_equal(served.get_fdata(), expected.get_fdata())


@pytest.mark.parametrize(
    "method, path, params, data, status",
    [("post", "/infer/cg_samr", {"image": "../case1"}, None, 400),
     ("post", "/infer/cg_samr", {"image": "/etc/passwd"}, None, 400),
     ("post", "/infer/cg_samr", {"image": "no_such_case"}, None, 404),
     ("post", "/infer/cg_samr", {"image": "leak"}, None, 403),
     ("post", "/infer/cg_samr", {"image": "case1"}, {"params": '{"manipulation": "explode"}'}, 400),
     ("post", "/infer/cg_samr", {"image": "case1"}, {"params": '{"seed": "one"}'}, 400),
     ("post", "/infer/cg_samr", {"image": "case1"}, {"params": '{"manipulation": "transplant"}'}, 400),
     ("post", "/infer/no_such_model", {"image": "case1"}, None, 400),
     ("put", "/datastore/image", {"image": "../../escaped"}, None, 400)],
)  # fmt: skip
def test_refusals_are_4xx_with_a_message(server, method, path, params, data, status):
    import requests

    files = (
        {"file": ("x.nii.gz", (server["studies"] / "case1.nii.gz").read_bytes())} if method == "put" else None
    )
    response = getattr(requests, method)(
        f"{server['url']}{path}", params=params, data=data, files=files, timeout=60
    )
    assert response.status_code == status, response.text
    assert response.json()["detail"]
    assert (
        not (server["root"] / "escaped.nii.gz").exists()
        and not (server["root"].parent / "escaped.nii.gz").exists()
    )


def test_cors_allows_only_the_servers_own_origin(server):
    import requests

    own = f"http://127.0.0.1:{server['port']}"
    for origin, allowed in ((own, True), ("http://evil.example", False)):
        response = requests.get(f"{server['url']}/info/", headers={"Origin": origin}, timeout=10)
        assert (response.headers.get("access-control-allow-origin") == origin) == allowed

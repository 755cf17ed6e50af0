"""``medsynth compare``: methods trained on one cohort side by side (Table I, Table V, Fig. 6), and
the refusal of runs trained on another cohort or split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from bundle_helpers import TINY_DATA, TINY_NETWORKS, TINY_TRAINING
from monai.bundle import run

from medsynth.cli import main
from medsynth.studies.compare import compare_runs, lesion_accuracy_table
from medsynth.utils.bundles import bundle_config_files

pytestmark = [
    pytest.mark.filterwarnings("ignore:parsing config_file"),
    pytest.mark.usefixtures("from_repository_root"),
]

REPO = Path(__file__).resolve().parents[1]
TINY = {**TINY_DATA, **TINY_TRAINING}
NETWORKS = {method: TINY_NETWORKS[method] for method in ("cg_samr", "pix2pix", "shin")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_phantom_cache) -> dict[str, Path]:
    import os

    os.chdir(REPO)
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for method, network in NETWORKS.items():
        out = root / method
        files = bundle_config_files(REPO / "bundles" / method, "train")
        run(config_file=files, output_dir=str(out), cache_dir=tiny_phantom_cache, **TINY, **network)
        runs[method] = out
    return runs


def test_the_lesion_accuracy_pools_the_classes_pixels():
    cases = pd.DataFrame({"case": ["a", "b"], "sequence": ["t1w", "t1w"], "Edema_correct": [3, 1],
                          "Edema_pixels": [4, 4], "Cavity_correct": [0, 0], "Cavity_pixels": [0, 2],
                          "Tumor_correct": [1, 0], "Tumor_pixels": [2, 0]})  # fmt: skip
    table = lesion_accuracy_table(cases)
    assert table["t1w"] == pytest.approx(100 * 5 / 12) and table["Avg."] == table["t1w"]


def test_compare_writes_tables_i_and_v_and_the_figure(trained, tiny_phantom_cache, tmp_path):
    overrides = {"cache_dir": tiny_phantom_cache, **TINY, **NETWORKS["cg_samr"], **NETWORKS["pix2pix"]}
    specs = [
        str(trained["cg_samr"]),
        f"{trained['pix2pix']}=bundles/pix2pix",
        f"{trained['shin']}=bundles/shin",
    ]
    written = compare_runs(specs, tmp_path / "cmp", overrides=overrides)
    table1 = pd.read_csv(written["table1_csv"], header=[0, 1], index_col=0)
    assert set(table1.columns.get_level_values(0)) == {"cg_samr", "pix2pix", "shin"}
    assert "SSIM brain" in set(table1.columns.get_level_values(1)) and "Avg." in table1.index
    table5 = pd.read_csv(tmp_path / "cmp" / "table5.csv", index_col=0)
    assert list(table5.index) == ["cg_samr", "pix2pix", "shin"] and list(table5.columns)[-1] == "Avg."
    assert ((table5 >= 0) & (table5 <= 100)).all().all()
    assert written["fig6"].stat().st_size > 10_000
    assert not (trained["cg_samr"] / "eval").exists()  # the run folders are left as they were
    stamp = (tmp_path / "cmp" / "cg_samr" / "table1_test_cases.csv").stat().st_mtime_ns
    compare_runs(specs, tmp_path / "cmp", overrides=overrides, figure=False)
    assert (tmp_path / "cmp" / "cg_samr" / "table1_test_cases.csv").stat().st_mtime_ns == stamp  # read back
    compare_runs(specs, tmp_path / "cmp", overrides={**overrides, "num_samples": 1}, figure=False)
    assert (
        tmp_path / "cmp" / "cg_samr" / "table1_test_cases.csv"
    ).stat().st_mtime_ns != stamp  # other settings


def test_runs_of_another_cohort_or_split_are_refused_by_name(trained, tmp_path, capfd):
    other = tmp_path / "other_split"
    shutil.copytree(trained["pix2pix"], other)
    record = json.loads((other / "models" / "atlas.json").read_text())
    record["fingerprint"] = "0" * 20  # another set of training patients builds another atlas
    (other / "models" / "atlas.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="trained on different cohorts or splits.*0{20}"):
        compare_runs([str(trained["cg_samr"]), f"{other}=bundles/pix2pix"], tmp_path / "cmp")
    code = main(
        [
            "compare",
            "--runs",
            str(trained["cg_samr"]),
            str(tmp_path / "untrained"),
            "--out",
            str(tmp_path / "c"),
        ]
    )
    error = capfd.readouterr().err
    assert code == 2 and "no trained model" in error and "Traceback" not in error  # one clear line

"""The augmentation study: aggregation on known numbers (intervals, a planted difference), the study
file's checks, and a tiny study end to end (2 arms x 2 seeds) with the resume of a killed run and
the scoring of another cohort with the cells' models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medsynth.studies import (
    StudySpec,
    bootstrap_mean,
    expand_cells,
    paired_difference,
    run_study,
    score_cohort,
    study_table,
)
from medsynth.studies import runner as study_runner

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file")

REPO = Path(__file__).resolve().parents[1]


def _long(arm: str, offset: float, seeds=3, patients=8, noise=0.02, rng=None) -> pd.DataFrame:
    rng = rng or np.random.default_rng(0)
    rows = []
    for seed in range(seeds):
        for patient in range(patients):
            base = 0.6 + 0.05 * patient / patients  # patients differ; arms are paired on them
            for name in ("edema", "tumor"):
                value = base + offset + rng.normal(0, noise)
                rows.append(
                    {"arm": arm, "method": "none" if arm == "real" else "x",
                     "amount": 0.0 if arm == "real" else 50.0, "seed": seed, "patient_id": f"p{patient}",
                     "class": name,
                     "Dice": value, "HD95": 10 - 10 * value, "Sensitivity": value, "Specificity": 0.99}
                )  # fmt: skip
    return pd.DataFrame(rows)


def test_the_interval_contains_the_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(1)
    small = pd.DataFrame(
        {"seed": np.repeat([0, 1], 5), "patient_id": list(range(5)) * 2, "value": rng.normal(0.7, 0.1, 10)}
    )
    mean, low, high = bootstrap_mean(small, draws=500)
    assert low <= mean <= high and mean == pytest.approx(small["value"].mean())
    large = pd.DataFrame(
        {
            "seed": np.repeat(range(5), 40),
            "patient_id": list(range(40)) * 5,
            "value": rng.normal(0.7, 0.1, 200),
        }
    )
    _, low_large, high_large = bootstrap_mean(large, draws=500)
    assert high_large - low_large < high - low


def test_a_planted_difference_is_detected_and_no_difference_is_not():
    real = _long("real", 0.0, rng=np.random.default_rng(2))
    better = _long("synthetic_50", 0.05, rng=np.random.default_rng(3))
    same = _long("same_50", 0.0, rng=np.random.default_rng(4))
    key = ["seed", "patient_id"]
    pick = lambda frame: frame[frame["class"] == "edema"][[*key, "Dice"]].rename(columns={"Dice": "value"})  # noqa: E731
    planted = paired_difference(pick(better), pick(real), draws=500)
    assert planted["difference"] == pytest.approx(0.05, abs=0.01)
    assert planted["low"] > 0 and planted["p_value"] < 0.01 and planted["pairs"] == 24
    null = paired_difference(pick(same), pick(real), draws=500)
    assert null["low"] < 0 < null["high"] and null["p_value"] > 0.05

    table = study_table(pd.concat([real, better, same]), "real", draws=300)
    row = table[
        (table["arm"] == "synthetic_50") & (table["class"] == "tumor") & (table["metric"] == "Dice")
    ].iloc[0]
    assert row["low"] <= row["mean"] <= row["high"] and row["vs_real_p_value"] < 0.01
    assert row["seeds"] == 3 and row["patients"] == 8
    assert table[table["arm"] == "real"]["vs_real_difference"].isna().all()


def test_a_study_file_is_checked_before_anything_runs(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "name": "x",
                "seeds": [0],
                "arms": [{"name": "real"}, {"name": "a", "method": "nope", "percent": 25}],
            }
        )
    )
    with pytest.raises(ValueError, match="not in 'synthesis'"):
        StudySpec.read(bad)
    bad.write_text(
        json.dumps({"name": "x", "seeds": [0], "arms": [{"name": "real"}, {"name": "c", "classic": True}]})
    )
    with pytest.raises(ValueError, match="exactly one of percent or multiple"):
        StudySpec.read(bad)
    for preset in sorted((REPO / "studies").glob("*.json")):
        spec = StudySpec.read(preset)  # every shipped preset is valid
        assert len(expand_cells(spec)) == len(spec.arms) * len(spec.seeds)


def test_a_tiny_study_runs_end_to_end_and_a_killed_one_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    study = tmp_path / "tiny.json"
    tiny = {"phantom_patients": 4, "phantom_shape": [48, 48, 6], "image_size": 32,
            "unet_channels": [4, 8, 16, 32, 64], "batch_size": 8,
            "num_epochs": 2, "val_interval": 1}  # fmt: skip
    study.write_text(
        json.dumps(
            {
                "name": "tiny",
                "cache_dir": str(tmp_path / "cache"),
                "out_dir": str(tmp_path / "study"),
                "seeds": [0, 1],
                "segmentation": {"overrides": tiny},
                "arms": [{"name": "real"}, {"name": "classic_50", "classic": True, "percent": 50}],
            }
        )
    )
    original = study_runner.run_cell
    finished = []

    def killed_after_one_cell(spec, cell, synthetic_dir=""):
        if finished:
            raise KeyboardInterrupt
        finished.append(cell.name)
        return original(spec, cell, synthetic_dir)

    monkeypatch.setattr(study_runner, "run_cell", killed_after_one_cell)
    with pytest.raises(KeyboardInterrupt):
        run_study(study, progress=False)
    monkeypatch.setattr(study_runner, "run_cell", original)
    first = tmp_path / "study" / "cells" / "real" / "seed0" / "cell.json"
    assert finished == ["real/seed0"] and first.is_file()
    written = first.stat().st_mtime_ns

    page = run_study(study, progress=False)
    assert first.stat().st_mtime_ns == written  # the finished cell was not redone
    report = page.parent
    for name in ("table2.csv", "table2.md", "study_table.csv", "dice_vs_amount.png", "study_config.json"):
        assert (report / name).is_file(), name
    table = pd.read_csv(report / "study_table.csv")
    assert set(table["arm"]) == {"real", "classic_50"} and set(table["seeds"]) == {2}
    dice = table[(table["metric"] == "Dice") & table["mean"].notna()]
    assert ((dice["low"] <= dice["mean"]) & (dice["mean"] <= dice["high"])).all()
    assert "vs_real_p_value" in table.columns
    assert "classic_50" in (report / "table2.md").read_text() and "<img" in page.read_text()
    versions = json.loads((report / "study_config.json").read_text())["versions"]
    assert versions["monai"] and versions["torch"]

    # Every cell's model scores every case of another cohort, with one call (the CLI's --score-cohort).
    from medsynth.data.cohort import resolve_cohort

    other = resolve_cohort("", tmp_path / "other_cache", seed=5, phantom_patients=3,
                           phantom_shape=(48, 48, 6), progress=False)  # fmt: skip
    other_dir = str(Path(other["label"].iloc[0]).parents[1])
    with pytest.raises(ValueError, match="no cell"):
        score_cohort(study, other_dir, cells=["real/seed9"], progress=False)
    scored = score_cohort(study, other_dir, progress=False)
    cohort = scored.parent.name.removeprefix("report_")
    assert cohort.startswith(Path(other_dir).name + "_")  # the name and a digest of the resolved path
    cases = pd.read_csv(
        tmp_path
        / "study"
        / "cells"
        / "classic_50"
        / "seed1"
        / f"eval_{cohort}"
        / "segmentation_all_cases.csv"
    )
    assert set(cases["patient_id"]) == set(other["patient_id"])
    external = pd.read_csv(scored.parent / "study_table.csv")
    assert set(external["arm"]) == {"real", "classic_50"}
    assert not external.equals(table)  # another cohort, other numbers
    assert (
        json.loads((scored.parent / "study_config.json").read_text())["config"]["scored_cohort"] == other_dir
    )


def test_the_qu_table2_study_has_the_papers_arms():
    from medsynth.studies.runner import StudySpec

    spec = StudySpec.read(Path(__file__).resolve().parents[1] / "studies" / "qu_table2.json")
    assert len(spec.arms) == 25 and spec.synthesis["sfm_gan"]["workflow"] == "synthesize"
    arms = {arm["name"]: arm for arm in spec.arms}
    assert {a.get("mode") for a in spec.arms if a.get("method")} == {
        "random",
        "real_first",
        "synthetic_first",
    }
    assert sorted(a["multiple"] for a in spec.arms if a.get("classic")) == [0.2, 0.5, 0.8, 1.0, 2.0, 3.0]
    assert arms["synthetic_only_x1"]["real_fraction"] == 0.0 and arms["real_x0.5"]["real_fraction"] == 0.5

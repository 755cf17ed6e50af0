"""``medsynth phantom`` on the command line."""

from __future__ import annotations

import pytest

from medsynth.cli import main
from medsynth.data.manifest import read_manifest


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["phantom", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--patients", "--seed", "--layout", "--shape", "--workers"):
        assert option in text


def test_tiny_run_writes_a_cohort(tmp_path, capsys):
    out = tmp_path / "cohort"
    code = main(
        [
            "phantom",
            "--out",
            str(out),
            "--patients",
            "1",
            "--seed",
            "2",
            "--shape",
            "48",
            "48",
            "6",
            "--no-progress",
        ]
    )
    assert code == 0
    assert str(out / "manifest.csv") in capsys.readouterr().out
    manifest = read_manifest(out / "manifest.csv")
    assert list(manifest["patient_id"]) == ["phantom_000"]
    assert (out / "phantom_000" / "phantom_000_montage.png").is_file()


def test_bad_input_exits_with_code_2(tmp_path):
    assert main(["phantom", "--out", str(tmp_path), "--patients", "0", "--no-progress"]) == 2

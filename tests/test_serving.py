"""``medsynth serve``'s request checks, without the server (``tests/test_serving_server.py`` runs the
real one where the serving environment is installed)."""

from __future__ import annotations

import asyncio
import json

import pytest

from medsynth.serving.security import DatastoreGuard, id_problem


@pytest.mark.parametrize(
    "value, words",
    [("../etc/passwd", "path separator"), ("/etc/passwd", "absolute path"), ("..", "'..'"),
     ("a\\b", "path separator"), ("x" * 300, "longer"), ("C:evil", "absolute path")],
)  # fmt: skip
def test_an_id_that_is_a_path_is_refused(value, words):
    assert words in id_problem(value)


@pytest.mark.parametrize("value", ["case1", "BraTS_2018_001", "a.b", "mask-1"])
def test_plain_ids_pass(value):
    assert id_problem(value) is None


def _guarded(tmp_path, query: str, path: str = "/infer/model", method: str = "POST"):
    """One request through the guard in front of an app that records whether it was reached."""
    studies = tmp_path / "studies"
    studies.mkdir(exist_ok=True)
    (studies / "case1.nii.gz").write_bytes(b"x")
    outside = tmp_path / "outside.nii.gz"
    outside.write_bytes(b"x")
    if not (studies / "leak.nii.gz").exists():
        (studies / "leak.nii.gz").symlink_to(outside)
    files = {"case1": studies / "case1.nii.gz", "leak": studies / "leak.nii.gz"}
    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def send(message):
        sent.append(message)

    guard = DatastoreGuard(app, studies, lambda: list(files), lambda image: str(files.get(image, "")))
    scope = {"type": "http", "path": path, "method": method, "query_string": query.encode()}
    asyncio.run(guard(scope, None, send))
    status = sent[0]["status"] if sent else None
    return status, (json.loads(sent[1]["body"])["detail"] if sent else None), bool(reached)


@pytest.mark.parametrize(
    "query, path, method, status",
    [("image=case1", "/infer/model", "POST", None), ("image=../x", "/infer/model", "POST", 400),
     ("image=/etc/passwd", "/infer/model", "POST", 400), ("image=nope", "/infer/model", "POST", 404),
     ("image=leak", "/infer/model", "POST", 403), ("image=../evil", "/datastore/image", "PUT", 400),
     ("image=new_case", "/datastore/image", "PUT", None), ("id=../x", "/datastore/", "DELETE", 400)],
)  # fmt: skip
def test_the_guard_refuses_paths_unknown_ids_and_links_out_of_the_studies(
    tmp_path, query, path, method, status
):
    got, detail, reached = _guarded(tmp_path, query, path, method)
    assert got == status, detail
    assert reached == (status is None)


def test_serve_without_the_serving_environment_says_how_to_build_it(tmp_path):
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("monailabel") is not None:
        pytest.skip(
            "the serving environment is installed here: tests/test_serving_server.py starts the server"
        )
    result = subprocess.run(
        [sys.executable, "-m", "medsynth", "serve", "--studies", str(tmp_path / "s"),
         "--models", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "apps/monailabel/install.sh" in result.stdout + result.stderr

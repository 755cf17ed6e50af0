"""``medsynth serve``: the trained models behind a MONAI Label server, on loopback, offline."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[2] / "apps" / "monailabel"
SEGMENTATION_BUNDLES = ("lesion_seg",)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve trained models through a MONAI Label server (loopback unless --host)",
        description=(
            "Start the MONAI Label server on apps/monailabel with the given runs as inference tasks: "
            "synthesis runs (RUN or RUN=bundles/samr, ...) take a lesion label map and return the "
            "sequences; a bundles/lesion_seg run (RUN=bundles/lesion_seg) segments a 4D multi-sequence "
            "image. Requests name images by datastore id only; paths, unknown ids and bad params get 4xx. "
            "Needs the serving environment (README: serving)."
        ),
    )
    parser.add_argument(
        "--studies", required=True, type=Path, help="the datastore folder (created if absent)"
    )
    parser.add_argument(
        "--models", nargs="+", required=True, metavar="RUN[=BUNDLE]", help="training runs to serve"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="where the networks run (default: %(default)s)")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="ID=VALUE",
        help="config overrides the runs were trained with (image_size, network sizes), for every model",
    )  # fmt: skip
    parser.set_defaults(func=run_serve)


def served_models(specs: list[str]) -> list[dict]:
    """The app config of the runs ``specs`` (``RUN[=BUNDLE]``): name, kind, bundle, run folder.

    Raises:
        FileNotFoundError: a run without weights, a bundle that is not one.
        ValueError: an ablation override (serve the ablation's run with its bundle instead), or two runs
            with one name.
    """
    from medsynth.data.atlas import model_atlas_sequences
    from medsynth.studies.compare import parse_run

    models = []
    for spec in specs:
        run = parse_run(spec)
        if run.override is not None:
            raise ValueError(f"{spec}: serving takes RUN=BUNDLE, not an override file")
        kind = "segmentation" if run.bundle.name in SEGMENTATION_BUNDLES else "synthesis"
        if kind == "synthesis" and model_atlas_sequences(run.run_dir / "models") is None:
            raise FileNotFoundError(
                f"run {run.run_dir}: no models/atlas.json (the model's atlas); retrain it"
            )
        models.append(
            {
                "name": run.name,
                "kind": kind,
                "bundle": str(run.bundle.resolve()),
                "run_dir": str(run.run_dir.resolve()),
            }
        )
    names = [m["name"] for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"two runs share a folder name {names}: the names are the served model ids")
    return models


def server_command(
    studies: Path, models: list[dict], host: str, port: int, device: str, overrides: dict | None = None
) -> list[str]:
    """The ``monailabel`` start command (MONAI Label's own server with medsynth's request checks)."""
    return [
        sys.executable, "-m", "monailabel.main", "start_server",
        "--app", str(APP_DIR), "--studies", str(studies.resolve()), "--host", host, "--port", str(port),
        "--uvicorn_app", "medsynth.serving.asgi:app",
        "--conf", "medsynth_models", json.dumps(models), "--conf", "medsynth_device", device,
        "--conf", "medsynth_overrides", json.dumps(overrides or {}),
    ]  # fmt: skip


def server_environment(host: str, port: int) -> dict[str, str]:
    """Same-origin CORS, and every MONAI Label task that could download or train switched off."""
    origin = f"http://{'127.0.0.1' if host in ('127.0.0.1', '0.0.0.0') else host}:{port}"
    return {
        **os.environ,
        # Read by medsynth.serving.asgi (MONAI Label 0.8.5 cannot export its own CORS setting).
        "MEDSYNTH_SERVE_ORIGIN": origin,
        "MONAI_ZOO_SOURCE": "ngc",  # no model-zoo look-up at start (any value but monaihosting)
        "MONAI_LABEL_TASKS_TRAIN": "false",
        "MONAI_LABEL_TASKS_STRATEGY": "false",
        "MONAI_LABEL_TASKS_SCORING": "false",
        "MONAI_LABEL_TASKS_BATCH_INFER": "false",
        "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
    }


def run_serve(args: argparse.Namespace) -> int:
    try:
        import monailabel  # noqa: F401
    except ImportError:
        raise FileNotFoundError(
            "monailabel is not installed here: build the serving environment (README: serving, "
            "apps/monailabel/install.sh)"
        ) from None
    models = served_models(args.models)
    args.studies.mkdir(parents=True, exist_ok=True)
    scope = (
        "loopback only" if args.host in ("127.0.0.1", "localhost", "::1") else "REACHABLE FROM THE NETWORK"
    )
    logger.info(
        "medsynth serve: http://%s:%d (%s), studies %s, models: %s",
        args.host, args.port, scope, args.studies.resolve(),
        ", ".join(f"{m['name']} ({m['kind']}, {Path(m['bundle']).name})" for m in models),
    )  # fmt: skip
    from medsynth.utils.bundles import parse_overrides

    command = server_command(
        args.studies, models, args.host, args.port, args.device, parse_overrides(args.set)
    )
    repository = APP_DIR.parents[1]  # the bundles' configs name each other relative to it
    return subprocess.run(command, cwd=repository, env=server_environment(args.host, args.port)).returncode

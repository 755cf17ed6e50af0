"""A small client of ``medsynth serve``: post a lesion mask, save the synthesized sequences.

    python -m medsynth.serving.client --server http://127.0.0.1:8000 --model cg_samr \\
        --mask case/label.nii.gz --out synthesized/ --manipulation mirror --seed 1

or :func:`synthesize` from Python. Needs only ``requests``.
"""

from __future__ import annotations

import argparse
import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["info", "main", "segment", "synthesize"]


def _checked(response) -> Any:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise RuntimeError(f"server answered {response.status_code}: {detail}")
    return response


def _post_file(server: str, model: str, path: str | Path, params: Mapping[str, Any], timeout: float):
    """``POST /infer/<model>?output=image`` with ``path`` uploaded as the request's image."""
    import requests

    with open(path, "rb") as handle:
        return _checked(
            requests.post(
                f"{server.rstrip('/')}/infer/{model}",
                params={"output": "image"},
                files={"file": (Path(path).name, handle, "application/gzip")},
                data={"params": json.dumps(dict(params))},
                timeout=timeout,
            )
        )


def info(server: str, timeout: float = 30.0) -> dict:
    """The server's ``/info/``: its models, their sequences, labels and parameters."""
    import requests

    return _checked(requests.get(f"{server.rstrip('/')}/info/", timeout=timeout)).json()


def synthesize(
    server: str,
    model: str,
    mask: str | Path,
    out_dir: str | Path,
    params: Mapping[str, Any] | None = None,
    timeout: float = 600.0,
) -> list[Path]:
    """Post ``mask`` (a label map NIfTI) to synthesis model ``model``; write what comes back to ``out_dir``.

    Returns the written files: every sequence, ``label.nii.gz`` (the mask used, after any
    manipulation), ``brain_mask.nii.gz`` and ``synthesis.json``; or the one sequence asked for with
    ``params["sequence"]`` (as ``<sequence>.nii.gz``).
    """
    params = dict(params or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    response = _post_file(server, model, mask, params, timeout)
    if params.get("sequence", "all") != "all":
        path = out_dir / f"{params['sequence']}.nii.gz"
        path.write_bytes(response.content)
        return [path]
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        names = archive.namelist()
        archive.extractall(out_dir)
    return [out_dir / name for name in names]


def segment(server: str, model: str, image: str | Path, out_file: str | Path, timeout: float = 600.0) -> Path:
    """Post a 4D multi-sequence NIfTI to the lesion-segmentation model; write its label map to ``out_file``.

    The volumes along the 4th axis are the model's sequences in its order (``/info/`` lists them)."""
    response = _post_file(server, model, image, {}, timeout)
    Path(out_file).write_bytes(response.content)
    return Path(out_file)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="post a lesion mask to medsynth serve, save the sequences")
    parser.add_argument("--server", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="a served synthesis model (see /info/)")
    parser.add_argument("--mask", required=True, help="label map NIfTI (0-4)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--manipulation", default="none")
    parser.add_argument("--grow-percent", type=float, default=100.0)
    parser.add_argument("--shrink-percent", type=float, default=-50.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sequence", default="all", help="one sequence, or all (a zip)")
    parser.add_argument("--donor", default="", help="datastore id of a donor label map (transplant)")
    args = parser.parse_args(argv)
    params = {
        "manipulation": args.manipulation, "grow_percent": args.grow_percent,
        "shrink_percent": args.shrink_percent, "seed": args.seed, "sequence": args.sequence,
        "donor": args.donor,
    }  # fmt: skip
    try:
        written = synthesize(args.server, args.model, args.mask, args.out, params)
    except (RuntimeError, OSError) as error:
        print(f"error: {error}")
        return 2
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

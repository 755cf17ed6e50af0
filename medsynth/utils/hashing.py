"""Fingerprints: short, stable hashes of text, settings, file contents and file stamps.

Every cache key, resumable-step record and landmark-file check of the project is built from these,
so the same inputs always give the same key (SHA-256 throughout).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["file_digest", "files_fingerprint", "json_digest", "parts_digest", "text_digest"]


def text_digest(text: str, length: int | None = None) -> str:
    """SHA-256 of ``text`` (UTF-8), as hex; the first ``length`` characters when given."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return digest if length is None else digest[:length]


def json_digest(payload: Any, length: int | None = None) -> str:
    """:func:`text_digest` of ``payload`` as canonical JSON (sorted keys, compact separators;
    values JSON does not know, such as paths, by their ``str``)."""
    return text_digest(json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str), length)


def parts_digest(*parts: object, length: int = 12) -> str:
    """:func:`text_digest` of the parts joined by ``|``: a short key for a handful of settings."""
    return text_digest("|".join(str(part) for part in parts), length)


def files_fingerprint(paths: Iterable[str | os.PathLike], length: int = 16) -> str:
    """A key that changes when any of ``paths`` changes: path, size and modification time of each
    (a missing file counts as ``missing``). Reads no file content, so it is cheap for large volumes."""
    parts = []
    for path in paths:
        try:
            stat = os.stat(path)
            parts.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}")
        except OSError:
            parts.append(f"{path}:missing")
    return parts_digest(*parts, length=length)


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, or of every file of a folder (relative name and bytes)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for item in files:
        digest.update(str(item.relative_to(path) if path.is_dir() else "").encode())
        with open(item, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()

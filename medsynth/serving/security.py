"""Request checks of the medsynth server: a request names images by datastore id, never by path.

The stock MONAI Label server resolves ``?image=`` to any existing file and writes datastore uploads
under an id taken as given; :class:`DatastoreGuard` refuses, before any endpoint runs, an id that is
a path (absolute, with a separator or ``..``), an image id the datastore does not hold (404), and an
id whose file resolves outside the studies folder (a symlink pointing out; 403).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["ID_PARAMETERS", "DatastoreGuard", "id_problem"]

# Query parameters that name datastore objects.
ID_PARAMETERS: tuple[str, ...] = ("image", "label", "id")
_MAX_ID_LENGTH = 255


def id_problem(value: str) -> str | None:
    """Why ``value`` is not an acceptable datastore id, or ``None``."""
    if len(value) > _MAX_ID_LENGTH:
        return f"longer than {_MAX_ID_LENGTH} characters"
    if "\x00" in value:
        return "contains a NUL character"
    if os.path.isabs(value) or value.startswith(("/", "\\")) or (len(value) > 1 and value[1] == ":"):
        return "is an absolute path; name an image by its datastore id"
    if "/" in value or "\\" in value:
        return "contains a path separator; name an image by its datastore id"
    if value in (".", "..") or ".." in value.split("."):
        return "is a relative path ('..'); name an image by its datastore id"
    return None


class DatastoreGuard:
    """ASGI middleware: refuse requests whose datastore ids are paths, unknown, or point out of the studies.

    Args:
        app: the wrapped ASGI application.
        studies: the studies (datastore) folder.
        image_ids: returns the datastore's image ids.
        image_path: returns the file of an image id ("" when unknown).
        checked_prefixes: URL paths (after the root) whose ``image`` must be a known datastore image.
    """

    def __init__(
        self,
        app,
        studies: str | os.PathLike,
        image_ids: Callable[[], Iterable[str]],
        image_path: Callable[[str], str],
        checked_prefixes: tuple[str, ...] = ("/infer/", "/datastore/image", "/datastore/label"),
    ) -> None:
        self.app = app
        self.studies = Path(studies).resolve()
        self.image_ids = image_ids
        self.image_path = image_path
        self.checked_prefixes = checked_prefixes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                status, message = refusal
                await _send_json(send, status, {"detail": message})
                return
        await self.app(scope, receive, send)

    def refusal(self, scope) -> tuple[int, str] | None:
        """``(status, message)`` when the request must be refused, else ``None``."""
        from urllib.parse import parse_qsl

        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        for key in ID_PARAMETERS:
            value = query.get(key, "")
            problem = id_problem(value) if value else None
            if problem:
                return 400, f"{key} {value!r} {problem}"
        image = query.get("image", "")
        path, method = scope.get("path", ""), scope.get("method", "GET")
        uploads = method == "PUT" and path.startswith("/datastore/image")  # adds a new id: checked above
        if image and not uploads and path.startswith(self.checked_prefixes):
            if image not in set(self.image_ids()):
                return 404, f"no image {image!r} in the datastore"
            resolved = Path(self.image_path(image)).resolve()
            if self.studies not in resolved.parents:
                return 403, f"image {image!r} resolves outside the studies folder"
        return None


async def _send_json(send, status: int, body: dict) -> None:
    import json

    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})

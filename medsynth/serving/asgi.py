"""What ``medsynth serve`` runs (``--uvicorn_app medsynth.serving.asgi:app``): MONAI Label's own FastAPI
application behind :class:`~medsynth.serving.security.DatastoreGuard`, with the project's input
errors answered 400 instead of 500.

MONAI Label reads its settings (app folder, studies) from the environment that its ``start_server``
exports before uvicorn imports this module; the CORS origin (same origin only) comes from
``MEDSYNTH_SERVE_ORIGIN``.
"""

from __future__ import annotations

import os

from fastapi import Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from monailabel.app import app as monailabel_app
from monailabel.config import settings
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.utils.app import app_instance

from medsynth.errors import InputDataError
from medsynth.serving.security import DatastoreGuard
from medsynth.serving.tasks import InvalidRequestError

__all__ = ["app"]


async def _bad_request(request: Request, error: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=400)


async def _monailabel_error(request: Request, error: MONAILabelException) -> JSONResponse:
    status = 400 if error.error == MONAILabelError.INVALID_INPUT else 500
    return JSONResponse({"detail": error.msg}, status_code=status)


for kind in (InvalidRequestError, InputDataError):
    monailabel_app.add_exception_handler(kind, _bad_request)
monailabel_app.add_exception_handler(MONAILabelException, _monailabel_error)
monailabel_app.add_middleware(
    DatastoreGuard,
    studies=settings.MONAI_LABEL_STUDIES,
    image_ids=lambda: app_instance().datastore().list_images(),
    image_path=lambda image: app_instance().datastore().get_image_uri(image),
)
# MONAI Label allows every origin, with credentials; a browser page of another site may not call us.
for middleware in monailabel_app.user_middleware:
    if middleware.cls is CORSMiddleware:
        middleware.kwargs["allow_origins"] = [os.environ.get("MEDSYNTH_SERVE_ORIGIN", "http://127.0.0.1")]
        middleware.kwargs["allow_credentials"] = False
app = monailabel_app

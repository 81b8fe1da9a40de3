"""`corral api`: FastAPI on uvicorn (DESIGN §10)."""

from corral.service.api._app import create_app, inline_worker_enabled
from corral.service.api._serve import run_api

__all__ = ["create_app", "inline_worker_enabled", "run_api"]

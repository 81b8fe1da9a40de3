"""The error body every endpoint of the API answers, and its entries in the OpenAPI
document; apart from the api package, whose routers (the console's too) take them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    type: str = Field(description="a stable error type, e.g. not_found, invalid_input")
    message: str


class ErrorBody(BaseModel):
    """Every error the API answers."""

    error: ErrorDetail


#: The error answers any endpoint may give, for the OpenAPI document: every router passes
#: them to its routes (APIRouter(responses=ERROR_RESPONSES)).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "malformed JSON"},
    401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
    413: {"model": ErrorBody, "description": "body over CORRAL_API_MAX_BODY_BYTES"},
    503: {"model": ErrorBody, "description": "the records or the queue are down"},
    422: {"model": ErrorBody, "description": "invalid input"},
}

"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, mapped in one place.

400: a request we refuse (bad values, unsupported options, too long); 404: an unknown model name;
503: the swarm cannot serve it now (no route: the message names the missing blocks); 500: a bug.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shardnet.errors import (
    CacheFullError,
    GenerationError,
    InvalidRequestError,
    RouteNotFoundError,
    ServerUnavailableError,
    ShardnetError,
)
from shardnet.gateway.schemas import ErrorDetail, ErrorResponse

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error the client sees as an OpenAI error object with this HTTP status."""

    def __init__(
        self, status: int, message: str, type: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.detail).model_dump(), status_code=self.status)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def from_exception(exc: BaseException) -> APIError:
    """The API error for an exception raised while generating."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RouteNotFoundError):
        return APIError(503, str(exc), "service_unavailable_error", None, "no_route")
    if isinstance(exc, (GenerationError, InvalidRequestError)):
        return bad_request(str(exc))
    if isinstance(exc, (ServerUnavailableError, CacheFullError)):
        return APIError(503, str(exc), "service_unavailable_error", None, "swarm_unavailable")
    if isinstance(exc, ShardnetError):
        return APIError(503, str(exc), "service_unavailable_error", None, type(exc).__name__)
    logger.error("unexpected error while generating", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


def _field(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _field(tuple(first.get("loc", ())))
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return bad_request(message, param, "invalid_value").response()


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return APIError(exc.status_code, str(exc.detail), kind).response()


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)

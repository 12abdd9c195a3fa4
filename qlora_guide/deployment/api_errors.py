"""OpenAI-style errors of the server: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

Every failure a client can cause answers this body: the server's own
refusals (:class:`ApiError`), FastAPI's request validation errors (turned
into a 400 that names the field, never FastAPI's 422 ``detail``), unknown
paths and methods (404, 405), and unexpected failures (500, without the
traceback, which goes to the server's log).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qlora_guide.deployment.api_types import ErrorBody, ErrorDetail, type_name

# pydantic's error types that mean "the value has the wrong JSON type"
TYPE_ERRORS = {"model_type", "model_attributes_type", "dict_type", "list_type", "int_from_float", "is_instance_of"}


class ApiError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        """The JSON body of the error."""
        return ErrorBody(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)).model_dump()

    def response(self) -> JSONResponse:
        """The error as a response."""
        return JSONResponse(self.body(), status_code=self.status)


def param_name(loc: tuple[Any, ...]) -> str | None:
    """A pydantic location as OpenAI names a parameter: ``("body", "messages", 0, "role")`` is ``messages[0].role``."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or None


def error_code(kind: str) -> str:
    """The OpenAI error code of a pydantic error type (custom errors already use the code as their type)."""
    if kind == "missing":
        return "missing_required_parameter"
    if kind in TYPE_ERRORS or kind.endswith(("_type", "_parsing")):
        return "invalid_type"
    if kind in {"invalid_type", "invalid_value", "invalid_content", "unsupported_parameter"}:
        return kind
    return "invalid_value"


def from_validation_error(error: RequestValidationError) -> ApiError:
    """The first problem of a request validation error, as a 400 that names the field."""
    first = error.errors()[0]
    kind, loc, msg = first["type"], tuple(first.get("loc", ())), first.get("msg", "invalid value")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", msg)
        return ApiError(400, f"the request body is not valid JSON: {detail}", code="invalid_json")
    param = param_name(loc)
    if param is None:  # the body as a whole
        if kind == "missing":
            return ApiError(400, "the request body is empty: send a JSON object", code="invalid_json")
        return ApiError(400, f"the request body must be a JSON object, not {type_name(first.get('input'))}", code="invalid_json")
    if kind == "missing":
        return ApiError(400, f"'{param}' is required", param=param, code="missing_required_parameter")
    if kind in {"invalid_type", "invalid_value", "invalid_content", "unsupported_parameter"} and msg.startswith("'"):
        message = msg  # a message of our own validators that already names the field
    else:
        message = f"'{param}': {msg[:1].lower() + msg[1:]}"
        if kind not in {"unsupported_parameter"} and not isinstance(first.get("input"), (dict, list)):
            message += f" (got {first.get('input')!r})"
    return ApiError(400, message, param=param, code=error_code(kind))


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    """Answer an :class:`ApiError`."""
    return error.response()


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """Answer a request validation error as OpenAI does: 400, naming the field."""
    return from_validation_error(error).response()


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Answer the router's own errors (unknown path, wrong method, unparsable body) in OpenAI's shape."""
    if error.status_code == 404:
        api = ApiError(404, f"unknown path {request.url.path}: see /v1/models, /v1/chat/completions, /v1/completions, /health", code="not_found")
    elif error.status_code == 405:
        allowed = error.headers.get("Allow", "") if error.headers else ""
        api = ApiError(405, f"{request.method} is not allowed on {request.url.path} (use {allowed})", code="method_not_allowed")
    elif error.status_code == 400:
        api = ApiError(400, f"the request body could not be read as JSON text: {error.detail}", code="invalid_json")
    else:
        api = ApiError(error.status_code, str(error.detail), code="http_error")
    response = api.response()
    if error.headers:
        response.headers.update(error.headers)
    return response


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    """Answer an unexpected failure with a 500; the traceback goes to the server's log (uvicorn's), not to the client."""
    return ApiError(500, f"internal error: {type(error).__name__}: {error}", type="server_error", code="internal_error").response()


def install_error_handlers(app: FastAPI) -> None:
    """Make every error of ``app`` answer OpenAI's error body."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)

"""Errors answered in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.

Each kind of failure is its own :class:`APIError` subclass carrying its HTTP status, OpenAI error type and
default code, so handlers raise what happened (:class:`ContextLengthError`, :class:`ModelNotFoundError`, ...) and
the one exception handler turns it into a response: nothing decides a status by reading a message. The
official ``openai`` client maps the statuses to its own exceptions (400 ``BadRequestError``, 401
``AuthenticationError``, 404 ``NotFoundError``, 429 ``RateLimitError``, 5xx ``InternalServerError``).
"""

from __future__ import annotations

from typing import ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import ErrorInfo, ErrorResponse


class APIError(Exception):
    """An error the API answers with: ``status`` and ``type`` are the class's, ``param`` names the request field
    at fault, ``code`` defaults to the class's."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param
        self.code = code if code is not None else self.default_code

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status)


class InvalidRequestError(APIError):
    """A request the server cannot serve as it is (400)."""

    status, type, default_code = 400, "invalid_request_error", "invalid_value"


class ContextLengthError(InvalidRequestError):
    """The prompt (or prompt + max_tokens) does not fit the context the engine serves."""

    default_code = "context_length_exceeded"


class InvalidPromptError(InvalidRequestError):
    """An empty prompt, or token ids outside the vocabulary."""

    default_code = "invalid_prompt"


class UnsupportedParameterError(InvalidRequestError):
    """A parameter OpenAI's API has that this server does not implement (yet)."""

    default_code = "unsupported_parameter"


class AuthenticationError(APIError):
    """A missing or wrong API key (401, as OpenAI answers it)."""

    status, type, default_code = 401, "invalid_request_error", "invalid_api_key"


class NotFoundError(APIError):
    """No such route (404)."""

    status, type, default_code = 404, "not_found_error", None


class ModelNotFoundError(APIError):
    """A model id this server does not serve (404, OpenAI's ``model_not_found``)."""

    status, type, default_code = 404, "invalid_request_error", "model_not_found"


class OverloadedError(APIError):
    """More requests in flight than ``max_pending`` (429: the client should retry later)."""

    status, type, default_code = 429, "rate_limit_error", "server_overloaded"


class ServerError(APIError):
    """The engine failed while serving the request (500)."""


class UnavailableError(APIError):
    """The engine thread is not running (503)."""

    status = 503


# what each endpoint needs at least, for the message about a missing body
_MINIMAL_BODY = {"/v1/completions": '{"prompt": "Hello"}',
                 "/v1/chat/completions": '{"messages": [{"role": "user", "content": "Hello"}]}',
                 "/tokenize": '{"prompt": "Hello"}', "/detokenize": '{"tokens": [1, 2, 3]}'}


def from_validation_error(exc: RequestValidationError, path: str = "") -> InvalidRequestError:
    """FastAPI's 422 (bad JSON, wrong types, values out of range) as OpenAI's 400, ``param`` the top-level
    field at fault (the message names the full location, e.g. ``messages.0.role``)."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    kind = first.get("type")
    if kind == "json_invalid":
        return InvalidRequestError(f"could not parse the JSON body: {first.get('msg', 'invalid JSON')}",
                                   code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # a union body (e.g. /tokenize's two forms) prefixes the location with the member's name
    if len(loc) > 1 and loc[0][:1].isupper():
        loc = loc[1:]
    msg = first.get("msg", "invalid request").removeprefix("Value error, ")  # pydantic's prefix for our checks
    if not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
        msg = "the request body must be a JSON object"
    if not loc and kind == "missing":  # no body at all
        example = _MINIMAL_BODY.get(path)
        return InvalidRequestError("the request has no body: send a JSON object"
                                   + (f", at least {example}" if example else ""), code="missing_body")
    return InvalidRequestError(f"{'.'.join(loc)}: {msg}" if loc else msg, param=loc[0] if loc else None)


def install_error_handlers(app: FastAPI) -> None:
    """Every error of ``app`` in OpenAI's shape: raised :class:`APIError` s, request validation (400), unknown
    routes and methods (404 / 405), and anything unexpected (500, with the exception's type and message)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return from_validation_error(exc, request.url.path).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return NotFoundError(str(exc.detail)).response()
        err = InvalidRequestError(str(exc.detail), code=None)
        response = err.response()
        response.status_code = exc.status_code
        return response

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return ServerError(f"{type(exc).__name__}: {exc}").response()

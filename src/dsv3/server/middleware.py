"""Request ids, one structured log line per request, and the optional API key.

:class:`RequestContext` is a plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``, which would buffer
streams and hide client disconnects from the handlers): it takes the client's ``X-Request-Id`` or makes one,
returns it in the response's headers, notes when the request arrived, and once the response has ended
(streams included) writes one JSON line on the ``dsv3.server`` logger with what the handler recorded in
:func:`log_fields` (tokens, time to first token, finish reasons).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
import uuid

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import AuthenticationError, ServerError
from .state import ServerState, get_state

log = logging.getLogger("dsv3.server")

REQUEST_ID_HEADER = "x-request-id"
_VALID_ID = re.compile(r"[!-~]{1,128}")  # visible ASCII: safe in a header and a log line
QUIET_PATHS = frozenset({"/health", "/metrics"})
"""Probes and scrapes: not logged (they would drown the requests)."""


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestContext:
    """ASGI middleware: request id in and out, arrival time, one log line per request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        request_id = given if given is not None and _VALID_ID.fullmatch(given) else new_request_id()
        arrival = time.monotonic()
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, arrival=arrival, log_fields={})
        status: list[int] = []

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # a bug: answer 500 here, so that the answer carries the request id too
            if status:
                raise
            log.exception("request %s failed", request_id)
            await ServerError(f"{type(exc).__name__}: {exc}").response()(scope, receive, send_with_id)
        finally:
            if scope["path"] not in QUIET_PATHS and log.isEnabledFor(logging.INFO):
                record = {"request_id": request_id, "method": scope["method"], "route": scope["path"],
                          "status": status[0] if status else 500, **state["log_fields"],
                          "e2e_s": round(time.monotonic() - arrival, 6)}
                log.info(json.dumps(record))


def request_id(request: Request) -> str:
    """The request's id (the client's ``X-Request-Id``, or one made for it)."""
    return request.state.request_id


def arrival(request: Request) -> float:
    """When the request arrived (``time.monotonic()``)."""
    return request.state.arrival


def log_fields(request: Request) -> dict:
    """The fields the handler adds to the request's log line (a dict it may update until the response ends)."""
    return request.state.log_fields


_bearer = HTTPBearer(auto_error=False, description="the server's API key (dsv3 serve --api-key, or $DSV3_API_KEY)")


async def require_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
                          state: ServerState = Depends(get_state)) -> None:
    """When the server has an API key, ``Authorization: Bearer KEY`` must carry it (401 otherwise)."""
    if state.api_key is None:
        return
    if credentials is None:
        raise AuthenticationError("this server needs an API key: send the header 'Authorization: Bearer KEY'")
    if not secrets.compare_digest(credentials.credentials.encode(), state.api_key.encode()):
        raise AuthenticationError("incorrect API key provided")

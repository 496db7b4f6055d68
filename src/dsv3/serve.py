"""The former home of the server, kept so that ``from dsv3.serve import create_app, serve`` keeps working: the
server is the package :mod:`dsv3.server` now."""

from .server.app import create_app, serve
from .server.errors import APIError
from .server.loop import EngineLoop

__all__ = ["APIError", "EngineLoop", "create_app", "serve"]

"""The server's options: one dataclass, used by :func:`dsv3.server.serve` and turned into ``dsv3 serve``'s flags
(:mod:`dsv3.config_flags`: each field's docstring is its help text). Importing it needs no web framework."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError

API_KEY_ENV = "DSV3_API_KEY"


@dataclass
class ServerConfig:
    """How ``dsv3 serve`` listens and admits requests (the engine's options are
    :class:`~dsv3.inference.EngineConfig`)."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface)."""
    port: int = 8000
    """TCP port."""
    model_name: str | None = None
    """The model's id in the API (default: the checkpoint directory's name; a run's name for its export/)."""
    api_key: str | None = None
    """Require 'Authorization: Bearer KEY' on the /v1 routes (default: $DSV3_API_KEY when set; /health,
    /metrics, /version, /tokenize and /detokenize stay open)."""
    max_pending: int | None = None
    """Requests queued or running before the server answers 429 (default unbounded)."""
    log_level: str = "info"
    """Log level of uvicorn and of the per-request lines on the dsv3.server logger (debug, info, warning, error)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must lie in [0, 65536), got {self.port}")
        if self.max_pending is not None and self.max_pending < 1:
            raise ConfigError(f"max_pending must be >= 1, got {self.max_pending}")
        if self.log_level.lower() not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ConfigError(f"log_level must be debug, info, warning or error, got {self.log_level!r}")
        if self.api_key == "":
            raise ConfigError("api_key must not be empty")

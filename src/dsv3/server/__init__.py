"""An OpenAI-compatible HTTP server over the inference engine (FastAPI + uvicorn: ``pip install 'dsv3[serve]'``).

Layers, each importing only those before it: :mod:`.config` (options; no web framework), :mod:`.protocol`
(request and response bodies), :mod:`.errors` (OpenAI-shaped errors), :mod:`.loop` (the engine thread),
:mod:`.logprobs` (log-probabilities in OpenAI's shapes), :mod:`.metrics` (Prometheus), :mod:`.state` (what the
routes share), :mod:`.middleware` (request ids, log lines, the API key), :mod:`.generation` (what the generation
endpoints share), :mod:`.completions`, :mod:`.chat` and :mod:`.routes` (the endpoints), :mod:`.app`
(:func:`create_app`, :func:`serve`). The routes and their behaviour are described in ``docs/serving.md``.

>>> app = create_app(Engine(model, tokenizer, max_batch=16), "my-model")   # then uvicorn.run(app)
>>> serve("runs/tiny", ServerConfig(port=8000))                             # load and serve a checkpoint
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import ServerConfig

if TYPE_CHECKING:
    from .app import create_app, serve
    from .errors import APIError
    from .loop import EngineLoop

_LAZY = {"create_app": "app", "serve": "app", "APIError": "errors", "EngineLoop": "loop"}


def __getattr__(name: str):
    """The web framework is imported on first use, so ``ServerConfig`` (and ``dsv3 --help``) work without it."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["APIError", "EngineLoop", "ServerConfig", "create_app", "serve"]

"""The FastAPI app over an engine (:func:`create_app`) and the blocking server of a checkpoint (:func:`serve`)."""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI

from .. import __version__
from ..inference import Engine, EngineConfig
from ..inference.chat import ChatTemplate
from ..loading import DeviceOptions, load
from ..runs import model_name as name_of
from . import chat, completions, routes
from .config import API_KEY_ENV, ServerConfig
from .errors import install_error_handlers
from .loop import EngineLoop
from .metrics import ServerMetrics
from .middleware import RequestContext, require_api_key
from .state import ServerState

DESCRIPTION = """An OpenAI-compatible API over the dsv3 inference engine: `/v1/completions` and
`/v1/chat/completions` (streaming as server-sent events), `/v1/models`, and vLLM's operations routes
(`/health`, `/metrics`, `/version`, `/tokenize`, `/detokenize`). Errors come in OpenAI's shape."""


def create_app(
    engine: Engine,
    model_name: str,
    *,
    chat_template: ChatTemplate | None = None,
    num_threads: int | None = None,
    max_pending: int | None = None,
    api_key: str | None = None,
) -> FastAPI:
    """The app serving ``engine`` (which needs a tokenizer) as model ``model_name``. The engine thread starts
    and stops with the app (its lifespan). ``chat_template`` defaults to DeepSeek-V3's format
    (:mod:`dsv3.inference.chat`); ``num_threads`` sets the engine thread's torch intra-op threads;
    ``max_pending`` bounds the requests queued or running (429 beyond); with ``api_key`` the /v1 routes
    require ``Authorization: Bearer <api_key>``."""
    if engine.tokenizer is None:
        raise ValueError("the server needs an engine with a tokenizer")
    metrics = ServerMetrics(engine, model_name)
    state = ServerState(
        engine=engine, loop=EngineLoop(engine, num_threads=num_threads, on_finish=metrics.observe),
        model_name=model_name, template=chat_template or ChatTemplate(engine.tokenizer), metrics=metrics,
        created=int(time.time()), max_pending=max_pending, api_key=api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop.start()
        try:
            yield
        finally:
            state.loop.stop()
            state.tokenizer_thread.shutdown(wait=False, cancel_futures=True)
            state.grammars.close()

    app = FastAPI(title="dsv3", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    guarded = [Depends(require_api_key)]
    app.include_router(completions.router, prefix="/v1", dependencies=guarded)
    app.include_router(chat.router, prefix="/v1", dependencies=guarded)
    app.include_router(routes.models_router, prefix="/v1", dependencies=guarded)
    app.include_router(routes.router)
    app.add_middleware(RequestContext)
    return app


def serve(
    checkpoint: str | Path,
    config: ServerConfig | None = None,
    engine: EngineConfig | None = None,
    device: DeviceOptions | None = None,
) -> None:
    """Load ``checkpoint`` (a Hugging Face layout directory or a ``dsv3 train`` run directory; on the GPU when
    there is one, see :class:`~dsv3.loading.DeviceOptions`) and serve it until interrupted, as ``config`` says
    (:class:`ServerConfig`; the API key defaults to ``$DSV3_API_KEY``), with an engine configured by
    ``engine`` (:class:`~dsv3.inference.EngineConfig`). The chat template comes from the checkpoint's
    tokenizer_config.json when it has one."""
    import uvicorn

    config = config or ServerConfig()
    device = device or DeviceOptions()
    model, tokenizer = load(checkpoint, device.device, device.dtype, fp8=device.fp8_weights)
    threads = device.cpu_threads(model)
    eng = Engine(model, tokenizer, engine or EngineConfig())
    print(f"engine: {eng.describe()}", file=sys.stderr)
    app = create_app(eng, config.model_name or name_of(checkpoint),
                     chat_template=ChatTemplate.load(tokenizer, checkpoint), num_threads=threads,
                     max_pending=config.max_pending, api_key=config.api_key or os.environ.get(API_KEY_ENV) or None)
    _log_requests(config.log_level)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level.lower())


def _log_requests(level: str) -> None:
    """Per-request JSON lines of the ``dsv3.server`` logger on stderr, unless the application set up logging."""
    logger = logging.getLogger("dsv3.server")
    logger.setLevel(level.upper() if level.lower() != "trace" else "DEBUG")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False

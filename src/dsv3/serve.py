"""An OpenAI-compatible HTTP server over the inference engine (FastAPI + uvicorn: ``pip install 'dsv3[serve]'``).

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``, with
OpenAI's request and response shapes, streaming as server-sent events (``data: {chunk}`` lines, then
``data: [DONE]``), ``usage`` token counts and errors as ``{"error": {"message", "type", "param", "code"}}``.

Threads: the engine and its :class:`~dsv3.inference.Scheduler` are synchronous and are touched by exactly one
thread, the :class:`EngineLoop`'s. HTTP handlers run on the asyncio event loop; they hand a submission (a
function that builds the prompt's token ids, and one :class:`SamplingParams` per choice) to the engine thread
through a queue and await its results; the engine thread tokenizes, submits to the engine, runs
``engine.step()`` while there is work, and passes every :class:`TokenEvent` back to the handler's
``asyncio.Queue`` with ``loop.call_soon_threadsafe``. Cancelling (a client that disconnects) only calls the
engine's thread-safe :meth:`~dsv3.inference.Engine.cancel`; the pages are freed at the next step.

Concurrency is bounded by the engine: at most ``max_batch`` sequences run at once, taking cache pages as they
grow (the latest admitted is preempted and recomputed when pages run out); further requests wait in the
scheduler's queue (first come, first served), and beyond
``max_pending`` waiting or running requests the server answers 429.

Choice i of a request with ``seed`` s samples with seed s + i. ``max_tokens`` defaults to 16 for completions (as
OpenAI's) and to the rest of the context for chat; a completion that reaches the engine's ``max_seq_len`` ends
with finish_reason "length". Extensions to OpenAI's parameters: ``top_k`` and ``ignore_eos`` (as in vLLM). Not
implemented: ``logprobs`` and ``echo`` (400), ``best_of``, penalties and ``logit_bias`` (ignored), tools.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .inference import CacheFullError, Engine, EngineConfig, GenerationRequest, GenerationResult, SamplingParams, TokenEvent
from .inference.chat import ChatTemplate

# ----------------------------------------------------------------------------------------------------
# errors


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# what each endpoint needs at least, for the message about a missing body
_MINIMAL_BODY = {"/v1/completions": '{"prompt": "Hello"}',
                 "/v1/chat/completions": '{"messages": [{"role": "user", "content": "Hello"}]}'}


def _validation_error(exc: RequestValidationError, path: str = "") -> APIError:
    """FastAPI's 422 (bad JSON, wrong types, values out of range) as OpenAI's 400."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, f"could not parse the JSON body: {first.get('msg', 'invalid JSON')}", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None  # the top-level field; the message names the full location
    msg = first.get("msg", "invalid request")
    if not loc and first.get("type") in ("model_attributes_type", "dict_type"):
        msg = "the request body must be a JSON object"
    if not loc and first.get("type") == "missing":  # no body at all
        example = _MINIMAL_BODY.get(path)
        msg = "the request has no body: send a JSON object" + (f", at least {example}" if example else "")
        return APIError(400, msg, code="missing_body")
    return APIError(400, f"{'.'.join(loc)}: {msg}" if loc else msg, param=param, code="invalid_value")


# ----------------------------------------------------------------------------------------------------
# request bodies (unknown fields are ignored, as OpenAI-compatible servers commonly do)

Stop = str | list[str] | None


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    temperature: Annotated[float | None, Field(ge=0, le=2)] = None
    top_p: Annotated[float | None, Field(gt=0, le=1)] = None
    top_k: Annotated[int | None, Field(ge=0)] = None
    n: Annotated[int, Field(ge=1, le=64)] = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: Stop = None
    seed: Annotated[int | None, Field(ge=0, lt=2**63)] = None
    ignore_eos: bool = False
    logprobs: Any = None
    user: str | None = None


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None


# ----------------------------------------------------------------------------------------------------
# the engine thread


@dataclass
class _Listener:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


Job = tuple[Callable[[], list[int]], list[SamplingParams]]
"""A function that builds a prompt's token ids (run on the engine thread), and one SamplingParams per choice."""


@dataclass
class _Submission:
    jobs: list[Job]
    listener: _Listener
    future: asyncio.Future


class EngineLoop:
    """The one thread that drives the engine: takes submissions from a queue, steps while there is
    work, and delivers events to the asyncio queues of the requests. ``num_threads`` sets torch's intra-op
    threads on this thread (on a CPU, 1 is fastest for small models)."""

    def __init__(self, engine: Engine, num_threads: int | None = None, idle_wait: float = 0.05):
        self.engine = engine
        self.scheduler = engine.scheduler
        self.num_threads = num_threads
        self.idle_wait = idle_wait
        self._inbox: queue.SimpleQueue[_Submission] = queue.SimpleQueue()
        self._listeners: dict[str, _Listener] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pending = 0
        """Requests submitted and not finished (counted on the event loop)."""
        self.error: BaseException | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.alive:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    async def submit(self, jobs: list[Job]) -> tuple[list[GenerationResult], asyncio.Queue]:
        """Queue one request per prompt and choice of ``jobs``, all or none; returns their results in order
        (filled in as tokens come) and the one queue that receives their :class:`TokenEvent` s. Raises what
        tokenizing or ``engine.submit`` raised (``ValueError``, :class:`CacheFullError`)."""
        loop = asyncio.get_running_loop()
        listener = _Listener(loop, asyncio.Queue())
        future = loop.create_future()
        self._inbox.put(_Submission(jobs, listener, future))
        self._wake.set()
        return await future, listener.queue

    def cancel(self, request_ids: list[str]) -> None:
        """Stop requests (thread-safe); their pages are freed at the engine's next step."""
        for rid in request_ids:
            self.engine.cancel(rid)
        self._wake.set()

    # -- on the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        while not self._stop.is_set():
            self._take_submissions()
            if not self.scheduler.has_work:
                self._wake.wait(self.idle_wait)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a failed step: fail the requests in flight, keep serving
                self.error = e
                events = self._fail_all(e)
            for event in events:
                self._deliver(event)
        for event in self._fail_all(RuntimeError("the server is shutting down")):
            self._deliver(event)

    def _take_submissions(self) -> None:
        while True:
            try:
                sub = self._inbox.get_nowait()
            except queue.Empty:
                return
            submitted: list[str] = []
            results = []
            try:
                for build_prompt, choices in sub.jobs:
                    prompt = build_prompt()
                    for params in choices:
                        request = GenerationRequest(prompt=prompt, params=params)
                        results.append(self.engine.submit(request))
                        submitted.append(request.request_id)
                        self._listeners[request.request_id] = sub.listener
            except Exception as e:
                self._drop(submitted)
                _call_soon(sub.listener.loop, _resolve, sub.future, None, e)
                continue
            if not _call_soon(sub.listener.loop, _resolve, sub.future, results, None, self, submitted):
                self._drop(submitted)  # the event loop is gone

    def _drop(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._listeners.pop(rid, None)
            self.engine.cancel(rid)

    def _deliver(self, event: TokenEvent) -> None:
        listener = self._listeners.get(event.request_id)
        if listener is None:
            return
        if event.finish_reason is not None:
            del self._listeners[event.request_id]
        if not _call_soon(listener.loop, listener.queue.put_nowait, event):
            self.engine.cancel(event.request_id)

    def _fail_all(self, error: BaseException) -> list[TokenEvent]:
        """Cancel every request with a listener and tell each one ``error`` (as an ``"error"`` finish)."""
        ids = list(self._listeners)
        for rid in ids:
            self.engine.cancel(rid)
        message = f"{type(error).__name__}: {error}"
        return [TokenEvent(rid, None, message, "error") for rid in ids]


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:  # loop closed
        return False


def _resolve(future: asyncio.Future, results, error, engine_loop: EngineLoop | None = None,
             request_ids: list[str] | None = None) -> None:
    """On the event loop: hand a submission's outcome to the handler awaiting it (or cancel the requests
    when that handler is gone)."""
    if future.cancelled():
        if engine_loop is not None and request_ids:
            engine_loop.cancel(request_ids)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(results)


# ----------------------------------------------------------------------------------------------------
# the app


class _EventStream(StreamingResponse):
    """A server-sent-event response that runs ``on_close`` however it ends (finished, client gone, error),
    even when the body iterator never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(
    engine: Engine,
    model_name: str,
    *,
    chat_template: ChatTemplate | None = None,
    num_threads: int | None = None,
    max_pending: int | None = None,
) -> FastAPI:
    """The FastAPI app serving ``engine`` (which needs a tokenizer) as model ``model_name``. The engine
    thread starts and stops with the app (its lifespan). ``chat_template`` defaults to DeepSeek-V3's format
    (:mod:`dsv3.inference.chat`); ``max_pending`` bounds the requests queued or running (429 beyond)."""
    if engine.tokenizer is None:
        raise ValueError("the server needs an engine with a tokenizer")
    from contextlib import asynccontextmanager

    template = chat_template or ChatTemplate(engine.tokenizer)
    driver = EngineLoop(engine, num_threads=num_threads)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        driver.start()
        try:
            yield
        finally:
            driver.stop()

    app = FastAPI(title="dsv3", lifespan=lifespan)
    app.state.engine_loop = driver
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc, request.url.path).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return APIError(500, f"{type(exc).__name__}: {exc}", type="server_error").response()

    # -- helpers -------------------------------------------------------------------------------------
    def check_model(body: _Common) -> None:
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{model_name}'.",
                           param="model", code="model_not_found")
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")

    def sampling(body: _Common, max_tokens: int | None, default_max: int, choice: int) -> SamplingParams:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        seed = None if body.seed is None else (body.seed + choice) % 2**63
        return SamplingParams(
            max_new_tokens=max_tokens or default_max,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            seed=seed,
            stop=[s for s in stop if s],
            ignore_eos=body.ignore_eos,
        )

    async def start(jobs: list[Job]):
        if not driver.alive:
            raise APIError(503, "the engine is not running", type="server_error")
        n_requests = sum(len(params) for _, params in jobs)
        if max_pending is not None and driver.pending + n_requests > max_pending:
            raise APIError(429, "too many requests in flight; retry later", type="rate_limit_error",
                           code="server_overloaded")
        try:
            results, events = await driver.submit(jobs)
        except CacheFullError as e:
            raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from e
        except ValueError as e:
            code = "context_length_exceeded" if "max_seq_len" in str(e) else "invalid_prompt"
            raise APIError(400, str(e), param="prompt", code=code) from e
        driver.pending += len(results)
        return results, events

    def finished(results: list[GenerationResult]) -> None:
        driver.pending -= len(results)

    def usage(results: list[GenerationResult], prompt_counts: int, n: int = 1) -> dict:
        """OpenAI's usage; the prompt counted once per prompt (not per choice), its cached tokens those the
        first choice of each prompt found in the prefix cache."""
        completion = sum(r.completion_tokens for r in results)
        cached = sum(r.cached_tokens for r in results[::n])
        return {"prompt_tokens": prompt_counts, "completion_tokens": completion,
                "total_tokens": prompt_counts + completion, "prompt_tokens_details": {"cached_tokens": cached}}

    async def wait_all(request: Request, results: list[GenerationResult], events: asyncio.Queue) -> None:
        """Await every result's end; cancel them all if the client goes away first."""
        open_ids = {r.request_id for r in results}
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while open_ids:
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    return
                event = getter.result()
                if event.finish_reason == "error":
                    raise APIError(500, event.text, type="server_error")
                if event.finish_reason is not None:
                    open_ids.discard(event.request_id)
        finally:
            gone.cancel()
            if open_ids:
                driver.cancel(list(open_ids))
            finished(results)

    def stream(results: list[GenerationResult], events: asyncio.Queue, make_chunk, first_chunks: list[dict],
               final_usage: Callable[[], dict] | None, base: dict) -> _EventStream:
        index = {r.request_id: i for i, r in enumerate(results)}
        open_ids = set(index)

        async def body() -> AsyncIterator[str]:
            for chunk in first_chunks:
                yield _sse(chunk)
            while open_ids:
                event = await events.get()
                if event.finish_reason == "error":
                    yield _sse({"error": {"message": event.text, "type": "server_error", "param": None,
                                          "code": None}})
                    open_ids.discard(event.request_id)
                    continue
                if event.finish_reason is not None:
                    open_ids.discard(event.request_id)
                if event.text or event.finish_reason is not None:
                    yield _sse(make_chunk(index[event.request_id], event.text, event.finish_reason))
            if final_usage is not None:
                yield _sse({**base, "choices": [], "usage": final_usage()})
            yield "data: [DONE]\n\n"

        closed = False

        def on_close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                if open_ids:
                    driver.cancel(list(open_ids))
                finished(results)

        return _EventStream(body(), on_close)

    # -- routes --------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not driver.alive:
            raise APIError(503, "the engine thread is not running", type="server_error")
        sch = engine.scheduler
        return {"status": "ok", "running": len(sch.running), "waiting": len(sch.waiting), "pending": driver.pending,
                "free_pages": engine.cache.num_free_pages, "num_pages": engine.cache.num_pages,
                "last_error": None if driver.error is None else repr(driver.error)}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "dsv3",
                "max_model_len": engine.max_seq_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist.", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        check_model(body)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo", code="unsupported_parameter")
        prompts = _prompt_list(body.prompt)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": now, "model": model_name}
        tokenizer = engine.tokenizer
        jobs = []
        for p_index, prompt in enumerate(prompts):
            params = [sampling(body, body.max_tokens, 16, p_index * body.n + j) for j in range(body.n)]
            build = (lambda p=prompt: tokenizer.encode(p)) if isinstance(prompt, str) else (lambda p=prompt: p)
            jobs.append((build, params))
        results, events = await start(jobs)
        prompt_tokens = sum(r.prompt_tokens for r in results[::body.n])

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            def chunk(i: int, text: str, reason: str | None) -> dict:
                return {**base, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}]}

            return stream(results, events, chunk, [],
                          (lambda: usage(results, prompt_tokens, body.n)) if include_usage else None, base)

        await wait_all(request, results, events)
        choices = [{"index": i, "text": r.text or "", "logprobs": None, "finish_reason": r.finish_reason}
                   for i, r in enumerate(results)]
        return {**base, "choices": choices, "usage": usage(results, prompt_tokens, body.n)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        check_model(body)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in body.messages]
        try:
            template.render(messages)  # validate here, so errors are 400s before anything is queued
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion", "created": now, "model": model_name}
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = [sampling(body, max_tokens, engine.max_seq_len, j) for j in range(body.n)]
        results, events = await start([(lambda: template.encode(messages), params)])
        prompt_tokens = results[0].prompt_tokens

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            chunk_base = {**base, "object": "chat.completion.chunk"}

            def chunk(i: int, text: str, reason: str | None) -> dict:
                delta = {"content": text} if text else {}
                return {**chunk_base, "choices": [{"index": i, "delta": delta, "logprobs": None,
                                                   "finish_reason": reason}]}

            first = [{**chunk_base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]}
                     for i in range(len(results))]
            return stream(results, events, chunk, first,
                          (lambda: usage(results, prompt_tokens, body.n)) if include_usage else None, chunk_base)

        await wait_all(request, results, events)
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text or ""}, "logprobs": None,
                    "finish_reason": r.finish_reason} for i, r in enumerate(results)]
        return {**base, "choices": choices, "usage": usage(results, prompt_tokens, body.n)}

    return app


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _prompt_list(prompt) -> list[str | list[int]]:
    """OpenAI's ``prompt``: a string, a list of token ids, or a list of either (a batch)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def serve(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model_name: str | None = None,
    device: str = "cpu",
    engine: EngineConfig | None = None,
    num_threads: int | None = None,
    max_pending: int | None = None,
    log_level: str = "info",
) -> None:
    """Load ``checkpoint`` (a Hugging Face layout directory or a ``dsv3 train`` run directory) onto ``device``
    and serve it on http://host:port until interrupted, with an engine configured by ``engine``
    (:class:`~dsv3.inference.EngineConfig`). The chat template comes from its tokenizer_config.json when it
    has one. On a CPU, ``num_threads`` defaults to :func:`dsv3.runs.default_cpu_threads`; the model's id
    defaults to :func:`dsv3.runs.model_name` (the run's name for a run's ``export/``)."""
    import uvicorn

    from .runs import default_cpu_threads, load_run_or_checkpoint, model_name as name_of

    model, tokenizer = load_run_or_checkpoint(checkpoint, device)
    eng = Engine(model, tokenizer, engine or EngineConfig())
    print(f"engine: {eng.describe()}", file=sys.stderr)
    if num_threads is None and eng.device.type == "cpu":
        num_threads = default_cpu_threads(model)
    name = model_name or name_of(checkpoint)
    app = create_app(eng, name, chat_template=ChatTemplate.load(tokenizer, checkpoint),
                     num_threads=num_threads, max_pending=max_pending)
    uvicorn.run(app, host=host, port=port, log_level=log_level)

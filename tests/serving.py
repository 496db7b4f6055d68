"""Fixtures and helpers of the server tests (``pytest_plugins = ["serving"]`` in each test_serve* module).

A real uvicorn server on 127.0.0.1 (a free port, in a background thread) serves a tiny random model with a
BPE trained on a few sentences; the official ``openai`` client and raw ``httpx`` talk to it. Each test module
gets its own server (fresh metrics); the checkpoint is built once per session.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

MODEL = "tiny-test"
MAX_SEQ_LEN = 96
TEXT = [
    "The quick brown fox jumps over the lazy dog. A fox is quick and a dog is lazy.\n",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Hello, how are you today? I am fine, thank you. The weather is nice.\n",
    "Once upon a time there was a small model that learned to speak.\n",
]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
"""openai-client keywords of a deterministic completion of exactly max_tokens tokens."""


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny random model (with its MTP module) and a 300-token BPE saved in the Hugging Face layout."""
    import dsv3
    from dsv3.data import train_tokenizer

    root = tmp_path_factory.mktemp("serve")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TEXT):
        (corpus / f"doc{i}.txt").write_text(text * 3)
    tok = train_tokenizer(corpus, root / "ckpt", vocab_size=300, show_progress=False)
    cfg = dsv3.preset("tiny").replace(vocab_size=tok.vocab_size, num_hidden_layers=2, max_position_embeddings=256)
    dsv3.save_pretrained(dsv3.build_model(cfg, seed=0), root / "ckpt")
    return root / "ckpt"


@pytest.fixture(scope="session")
def loaded(checkpoint):
    import dsv3

    return dsv3.load(checkpoint, "cpu")


TOOL_MAX_SEQ_LEN = 1024


@pytest.fixture(scope="session")
def tool_loaded(tmp_path_factory):
    """(model, tokenizer) whose byte-level BPE has DeepSeek-V3's tool-call and tool-output markers as special
    tokens (as the official tokenizer has), trained on text, JSON and tool calls; a tiny random model over it,
    with room for a prompt that describes tools."""
    import dsv3
    from dsv3.data import train_tokenizer
    from dsv3.inference import tool_calls as tc

    root = tmp_path_factory.mktemp("serve-tools")
    corpus = root / "corpus"
    corpus.mkdir()
    calls = [tc.format_tool_calls([tc.ToolCall("", "get_weather", '{"city":"Paris","unit":"C"}')]),
             '{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}',
             '## Tools\n\nYou can call these functions:\n\n### search\nParameters (JSON schema): ']
    for i, text in enumerate(TEXT + calls):
        (corpus / f"doc{i}.txt").write_text(text * 3)
    tok = train_tokenizer(corpus, root / "tok", vocab_size=400, show_progress=False)
    tok.hf.add_special_tokens([tc.TOOL_CALLS_BEGIN, tc.TOOL_CALLS_END, tc.TOOL_CALL_BEGIN, tc.TOOL_CALL_END,
                               tc.TOOL_SEP, tc.TOOL_OUTPUTS_BEGIN, tc.TOOL_OUTPUTS_END, tc.TOOL_OUTPUT_BEGIN,
                               tc.TOOL_OUTPUT_END])
    cfg = dsv3.preset("tiny").replace(vocab_size=tok.vocab_size, num_hidden_layers=2,
                                      max_position_embeddings=TOOL_MAX_SEQ_LEN)
    return dsv3.build_model(cfg, seed=0).eval(), tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """Serve ``app`` with uvicorn on a free loopback port for the block; yields its base URL."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(400):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


def make_engine(loaded, **options):
    from dsv3.inference import Engine

    model, tok = loaded
    return Engine(model, tok, **{"max_batch": 8, "max_seq_len": MAX_SEQ_LEN, "page_size": 8, **options})


@pytest.fixture(scope="module")
def server(loaded):
    """(base URL, engine) of a server of this module."""
    from dsv3.server import create_app

    engine = make_engine(loaded)
    with running(create_app(engine, MODEL, num_threads=1)) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    import openai

    url, _ = server
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(loaded):
    """Greedy completions computed by a separate engine over the same model (never run concurrently)."""
    from dsv3.inference import SamplingParams

    engine = make_engine(loaded, max_batch=4)

    def complete(prompt, max_tokens: int, stop=()):
        p = SamplingParams(max_new_tokens=max_tokens, temperature=0, ignore_eos=True, stop=list(stop))
        return engine.generate([prompt], p)[0]

    return complete


def wait_idle(engine, timeout: float = 20.0) -> None:
    """Until the engine thread has retired every request (cancelled ones are retired at its next step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sch = engine.scheduler
        if not sch.running and not sch.waiting and engine.cache.num_free_pages == engine.cache.num_pages:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine still busy: {len(engine.scheduler.running)} running, "
                         f"{engine.cache.num_free_pages}/{engine.cache.num_pages} pages free")


@contextlib.contextmanager
def slowed(engine, seconds: float = 0.005):
    """Make each decode step of the server's engine ``seconds`` longer (so that clients can drop requests
    before they finish) and record the ids the server cancels."""
    cancelled, step, cancel = [], engine._plain_step, engine.cancel
    engine._plain_step = lambda plan: (time.sleep(seconds), step(plan))[1]
    engine.cancel = lambda rid: (cancelled.append(rid), cancel(rid))[1]
    try:
        yield cancelled
    finally:
        del engine._plain_step, engine.cancel


def error_of(response) -> dict:
    """The OpenAI-shaped error of a 4xx response."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """``/metrics`` parsed with prometheus_client's parser: {(sample name, sorted labels): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels) -> float:
    """The value of one sample (labels other than ``model_name`` as keywords); 0 when absent."""
    want = tuple(sorted({"model_name": MODEL, **labels}.items()))
    return samples.get((name, want), 0.0)


# ------------------------------------------------------------------------------------------------------
# the served model's own forward, for checking what the server computed

def full_logits(loaded, ids: list[int]):
    """The model's raw float32 logits at every position of ``ids`` (its full forward, no cache): (len, V). Call
    it while the server is idle (the engine thread shares the model)."""
    import torch

    model, _ = loaded
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def greedy_ids(loaded, prompt: list[int], n: int, process=None) -> list[int]:
    """``n`` greedy tokens after ``prompt`` computed from scratch with full forwards: each the argmax of
    ``process(logits, generated so far)`` (default: the raw logits), the definition a server's sampling controls
    are checked against."""
    out: list[int] = []
    for _ in range(n):
        logits = full_logits(loaded, prompt + out)[-1]
        out.append(int((logits if process is None else process(logits, out)).argmax()))
    return out

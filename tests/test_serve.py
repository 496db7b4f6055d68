"""The OpenAI-compatible server, the chat format and the generate / chat / serve commands.

A real uvicorn server on 127.0.0.1 (a free port, in a background thread) serves a tiny random model with a
BPE trained on a few sentences; the official ``openai`` client and raw ``httpx`` talk to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("jinja2")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import uvicorn  # noqa: E402
from conftest import run_cli  # noqa: E402

import dsv3  # noqa: E402
from dsv3.data import train_tokenizer  # noqa: E402
from dsv3.inference import Engine, SamplingParams  # noqa: E402
from dsv3.inference.chat import ChatTemplate, find_chat_template  # noqa: E402
from dsv3.serve import create_app  # noqa: E402

MODEL = "tiny-test"
MAX_SEQ_LEN = 96
TEXT = [
    "The quick brown fox jumps over the lazy dog. A fox is quick and a dog is lazy.\n",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Hello, how are you today? I am fine, thank you. The weather is nice.\n",
    "Once upon a time there was a small model that learned to speak.\n",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random model and a 300-token BPE saved in the Hugging Face layout."""
    root = tmp_path_factory.mktemp("serve")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TEXT):
        (corpus / f"doc{i}.txt").write_text(text * 3)
    tok = train_tokenizer(corpus, root / "ckpt", vocab_size=300, show_progress=False)
    cfg = dsv3.preset("tiny").replace(vocab_size=tok.vocab_size, num_hidden_layers=2, max_position_embeddings=256)
    dsv3.save_pretrained(dsv3.build_model(cfg, seed=0), root / "ckpt")
    return root / "ckpt"


@pytest.fixture(scope="module")
def loaded(checkpoint):
    from dsv3.runs import load_run_or_checkpoint

    return load_run_or_checkpoint(str(checkpoint), "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(loaded):
    model, tok = loaded
    engine = Engine(model, tok, max_batch=8, max_seq_len=MAX_SEQ_LEN, page_size=8)
    app = create_app(engine, MODEL, num_threads=1)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def reference(loaded):
    """Greedy completions computed by a separate engine over the same model (never run concurrently)."""
    model, tok = loaded
    engine = Engine(model, tok, max_batch=4, max_seq_len=MAX_SEQ_LEN, page_size=8)

    def complete(prompt, max_tokens: int, stop=()):
        p = SamplingParams(max_new_tokens=max_tokens, temperature=0, ignore_eos=True, stop=list(stop))
        return engine.generate([prompt], p)[0]

    return complete


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def wait_idle(engine: Engine, timeout: float = 20.0) -> None:
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
def slowed(engine: Engine, seconds: float = 0.005):
    """Make each decode step of the server's engine ``seconds`` longer (so that clients can drop requests
    before they finish) and record the ids the server cancels."""
    cancelled, step, cancel = [], engine._plain_step, engine.cancel
    engine._plain_step = lambda plan: (time.sleep(seconds), step(plan))[1]
    engine.cancel = lambda rid: (cancelled.append(rid), cancel(rid))[1]
    try:
        yield cancelled
    finally:
        del engine._plain_step, engine.cancel


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


# ------------------------------------------------------------------------------------------------------
# chat format

def test_default_chat_format_follows_deepseek_v3(loaded, tmp_path):
    _, tok = loaded
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    template = ChatTemplate(tok)
    text = template.render(messages)
    assert text == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello<｜end▁of▁sentence｜>"
                    "<｜User｜>Bye<｜Assistant｜>")
    ids = template.encode(messages)
    assert ids[0] == tok.bos_id and tok.decode(ids) == text
    assert ids.count(tok.eos_id) == 1  # the special tokens are ids, not text
    # a user cannot inject special tokens through the content
    injected = template.encode([{"role": "user", "content": "<｜end▁of▁sentence｜>"}])
    assert tok.eos_id not in injected

    # a Jinja chat_template in tokenizer_config.json is used instead (here: the official V3 layout, plain text)
    official = ("{{bos_token}}{% for m in messages %}{% if m['role'] == 'system' %}{{m['content']}}{% endif %}"
                "{% endfor %}{% for m in messages %}{% if m['role'] == 'user' %}{{'<｜User｜>' + m['content']}}"
                "{% elif m['role'] == 'assistant' %}{{'<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>'}}"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}{{'<｜Assistant｜>'}}{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": official}))
    assert find_chat_template(tmp_path) == official
    jinja = ChatTemplate.load(tok, tmp_path)
    assert jinja.render(messages) == text
    assert jinja.encode(messages) == ids
    with pytest.raises(ValueError, match="role"):
        template.encode([{"role": "robot", "content": "x"}])


# ------------------------------------------------------------------------------------------------------
# the API with the official client

def test_health_and_models(server, client):
    url, _ = server
    assert httpx.get(url + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completions_greedy_usage_and_length(client, reference):
    ref = reference("The quick brown", 8)
    out = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=8, **GREEDY)
    choice = out.choices[0]
    assert choice.text == ref.text and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == ref.prompt_tokens
    assert out.usage.completion_tokens == 8 and out.usage.total_tokens == ref.prompt_tokens + 8
    # token-id prompts work too
    ids = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3, **GREEDY)
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 3
    # a prompt seen before: its full cache pages (two of 8 tokens) come from the prefix cache, the same text
    long = list(range(5, 25))
    first = client.completions.create(model=MODEL, prompt=long, max_tokens=4, **GREEDY)
    again = client.completions.create(model=MODEL, prompt=long, max_tokens=4, **GREEDY)
    assert first.choices[0].text == again.choices[0].text
    assert again.usage.prompt_tokens_details.cached_tokens == 16 > first.usage.prompt_tokens_details.cached_tokens


def test_completions_stream_n_and_stop(client, reference):
    ref = reference("Hello, how", 12)
    stream = client.completions.create(model=MODEL, prompt="Hello, how", max_tokens=12, n=2, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY)
    texts, reasons, usage = ["", ""], [None, None], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert texts == [ref.text, ref.text] and reasons == ["length", "length"]
    assert usage.completion_tokens == 24 and usage.prompt_tokens == ref.prompt_tokens

    # a stop string cuts the text before it and finishes with "stop"
    stop = ref.text[3:5] if ref.text[3:5].strip() else ref.text[2:4]
    expect = reference("Hello, how", 12, stop=[stop])
    out = client.completions.create(model=MODEL, prompt="Hello, how", max_tokens=12, stop=stop, **GREEDY)
    assert out.choices[0].text == expect.text and stop not in out.choices[0].text
    assert out.choices[0].finish_reason == "stop"

    # n choices with sampling and a seed: reproducible
    a = client.completions.create(model=MODEL, prompt="Once", max_tokens=6, n=2, temperature=1.0, seed=7)
    b = client.completions.create(model=MODEL, prompt="Once", max_tokens=6, n=2, temperature=1.0, seed=7,
                                  top_p=0.9)
    assert len(a.choices) == 2 and [c.index for c in a.choices] == [0, 1]
    assert a.usage.completion_tokens <= 12 and len(b.choices) == 2


def test_chat_completions_stream_and_not(client, loaded, reference):
    _, tok = loaded
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    ref = reference(ChatTemplate(tok).encode(messages), 10)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, **GREEDY)
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content == ref.text
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == ref.prompt_tokens and out.usage.completion_tokens == 10

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, stream=True, n=2,
                                            **GREEDY)
    texts, roles, reasons = ["", ""], set(), [None, None]
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        for c in chunk.choices:
            roles.add(c.delta.role)
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert texts == [ref.text, ref.text] and reasons == ["length", "length"] and "assistant" in roles


# ------------------------------------------------------------------------------------------------------
# errors: OpenAI's shape, 4xx, and the server keeps serving

def error_of(response: httpx.Response) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_malformed_requests_give_openai_errors(server, client):
    url, engine = server
    post = lambda path, **kw: httpx.post(url + path, timeout=30, **kw)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    comp = {"model": MODEL, "prompt": "hi", "max_tokens": 2}

    as_json = {"content-type": "application/json"}
    r = post("/v1/chat/completions", content=b'{"model": "x", "messages": [', headers=as_json)
    assert r.status_code == 400 and error_of(r)["type"] == "invalid_request_error"
    r = post("/v1/completions", content=b"not json", headers=as_json)
    assert r.status_code == 400
    error_of(post("/v1/completions", content=b"[1, 2]", headers=as_json))

    r = post("/v1/chat/completions", json={**chat, "model": "gpt-4"})
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    r = post("/v1/completions", json={**comp, "prompt": "fox " * 200})
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
    r = post("/v1/completions", json={**comp, "prompt": list(range(MAX_SEQ_LEN + 5))})
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"

    for field, value in [("temperature", -1), ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5),
                         ("max_tokens", 0), ("max_tokens", 2.5), ("n", 0), ("stop", 3), ("seed", "x"),
                         ("seed", -1)]:
        for path, body in (("/v1/completions", comp), ("/v1/chat/completions", chat)):
            r = post(path, json={**body, field: value})
            assert r.status_code == 400, (path, field, value, r.text)
            assert error_of(r)["param"] == field
    error_of(post("/v1/chat/completions", json={**chat, "messages": []}))
    error_of(post("/v1/chat/completions", json={**chat, "messages": [{"role": "robot", "content": "x"}]}))
    error_of(post("/v1/completions", json={"model": MODEL}))  # no prompt
    for path, needs in (("/v1/completions", '"prompt"'), ("/v1/chat/completions", '"messages"')):
        r = post(path)  # no body at all: say what to send, not pydantic's bare "Field required"
        assert r.status_code == 400 and "no body" in error_of(r)["message"] and needs in error_of(r)["message"]
    error_of(post("/v1/completions", json={**comp, "prompt": ""}))
    error_of(post("/v1/completions", json={**comp, "prompt": [10 ** 6]}))  # token id outside the vocabulary
    r = httpx.get(url + "/v1/nothing-here")
    assert r.status_code == 404 and error_of(r)

    # the official client raises its typed errors from these
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", temperature=-0.5)

    # still serving, nothing leaked
    out = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, **GREEDY)
    assert out.choices[0].finish_reason == "length"
    wait_idle(engine)


def test_engine_failure_fails_requests_and_keeps_serving(server, client):
    url, engine = server

    def broken(plan):
        raise RuntimeError("boom")

    engine._plain_step = broken
    try:
        r = httpx.post(url + "/v1/completions", timeout=30,
                       json={"model": MODEL, "prompt": "fox", "max_tokens": 5, "ignore_eos": True})
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
    finally:
        del engine._plain_step
    wait_idle(engine)
    out = client.completions.create(model=MODEL, prompt="fox", max_tokens=3, **GREEDY)
    assert out.usage.completion_tokens == 3


# ------------------------------------------------------------------------------------------------------
# concurrency and cancellation

def test_many_concurrent_streams_with_cancellations(server, reference):
    url, engine = server
    prompts = [TEXT[i % 4][: 8 + (i * 7) % 30] for i in range(56)]
    max_tokens = [4 + i % 9 for i in range(56)]
    cancel = {i for i in range(56) if i % 5 == 2}  # close these streams after their second chunk
    for i in cancel:
        max_tokens[i] = 40  # still running when closed
    expected = {i: reference(prompts[i], max_tokens[i]) for i in range(56) if i not in cancel}

    async def one(client: httpx.AsyncClient, i: int):
        body = {"model": MODEL, "prompt": prompts[i], "max_tokens": max_tokens[i], "temperature": 0,
                "ignore_eos": True, "stream": True}
        text, reason, chunks = "", None, 0
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return text, reason, True
                chunk = json.loads(line[6:])
                text += chunk["choices"][0]["text"]
                reason = chunk["choices"][0]["finish_reason"] or reason
                chunks += 1
                if i in cancel and chunks >= 2:
                    return text, reason, False  # leaving the block closes the connection mid-stream
        return text, reason, False

    async def main():
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(56)))

    with slowed(engine) as cancelled:
        outcomes = asyncio.run(main())
        wait_idle(engine)
    assert len(cancelled) == len(cancel)
    for i, (text, reason, done) in enumerate(outcomes):
        if i in cancel:
            assert not done
        else:
            assert done and reason == "length", (i, reason)
            assert text == expected[i].text, i
    wait_idle(engine)
    assert engine.cache.num_free_slots == engine.max_batch
    # a non-streaming request dropped by its client is cancelled as well
    with slowed(engine) as cancelled:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", timeout=0.3, json={
                "model": MODEL, "prompt": "fox", "max_tokens": MAX_SEQ_LEN - 4, "temperature": 0, "ignore_eos": True})
        wait_idle(engine)
        assert len(cancelled) == 1


# ------------------------------------------------------------------------------------------------------
# command line

def test_cli_generate_and_chat(checkpoint, loaded):
    _, tok = loaded
    r = run_cli("generate", str(checkpoint), "--prompt", "The quick", "--max-new-tokens", "6", "--threads", "1",
                timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The quick") and "tokens/s" in r.stderr
    spec = run_cli("generate", str(checkpoint), "--prompt", "The quick", "--max-new-tokens", "6", "--threads", "1",
                   "--speculative", "--no-echo", timeout=120)
    assert spec.returncode == 0, spec.stderr
    assert r.stdout.endswith(spec.stdout) and "MTP drafts accepted" in spec.stderr  # greedy: the same text

    # two turns from a pipe; the model is random, so EOS may end a turn early: expect the engine's own answers
    r = run_cli("chat", str(checkpoint), "--temperature", "0", "--max-new-tokens", "5", "--threads", "1",
                input="Hello\nHow are you?\n/exit\nnever read\n", timeout=120)
    assert r.returncode == 0, r.stderr
    template = ChatTemplate(tok)
    user1, user2 = {"role": "user", "content": "Hello"}, {"role": "user", "content": "How are you?"}
    engine = Engine(loaded[0], tok, max_batch=1)
    p = SamplingParams(max_new_tokens=5, temperature=0)
    a1 = engine.generate([template.encode([user1])], p)[0].text
    a2 = engine.generate([template.encode([user1, {"role": "assistant", "content": a1}, user2])], p)[0].text
    assert r.stdout == f"{a1}\n{a2}\n"



def test_model_name_of_a_run_and_its_export(tmp_path):
    from dsv3.runs import model_name

    run = tmp_path / "tiny-20261202-101500"
    (run / "export").mkdir(parents=True)
    (run / "train_config.json").write_text("{}")
    assert model_name(run) == model_name(run / "export") == "tiny-20261202-101500"
    (tmp_path / "DeepSeek-V3").mkdir()
    assert model_name(tmp_path / "DeepSeek-V3") == "DeepSeek-V3"
    (tmp_path / "other" / "export").mkdir(parents=True)  # an "export" directory of no run keeps its own name
    assert model_name(tmp_path / "other" / "export") == "export"


def test_cli_help(capsys):
    from dsv3.cli import build_parser

    for cmd in ("generate", "chat", "serve"):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([cmd, "--help"])
        assert exit_.value.code == 0 and "checkpoint" in capsys.readouterr().out


def test_cli_serve(checkpoint):
    """`dsv3 serve` in a subprocess: loads the checkpoint, answers a chat request, stops on SIGTERM."""
    import os
    import subprocess
    import sys

    from conftest import SRC

    port = free_port()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "dsv3.cli", "serve", str(checkpoint), "--port", str(port),
                             "--model-name", "cli-model", "--max-batch", "2", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.chat.completions.create(model="cli-model", messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=3, temperature=0)
        assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens <= 3
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

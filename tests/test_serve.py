"""The OpenAI-compatible server's generation endpoints, the chat format and the generate / chat / serve commands.

Fixtures (a live uvicorn server of a tiny model on loopback, the official ``openai`` client) are in
``tests/serving.py``; the operations routes are tested in test_serve_ops.py, concurrency and cancellation in
test_serve_load.py, the benchmark client in test_serve_bench.py.
"""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("jinja2")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

pytest.register_assert_rewrite("serving")  # its asserts report values; it is also this module's fixture plugin
from conftest import run_cli  # noqa: E402
from serving import GREEDY, MAX_SEQ_LEN, MODEL, error_of, free_port, wait_idle  # noqa: E402

import dsv3  # noqa: E402
from dsv3.inference import Engine, SamplingParams  # noqa: E402
from dsv3.inference.chat import ChatTemplate, find_chat_template  # noqa: E402

pytest_plugins = ["serving"]
pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_chat_continues_the_final_assistant_message(client, loaded, reference):
    """vLLM's ``continue_final_message`` (with ``add_generation_prompt`` false): the last, assistant message is
    left open and the model goes on from its text ("prefix completion"); ``echo`` starts the reply with it."""
    _, tok = loaded
    template = ChatTemplate(tok)
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Sure, here"}]
    ids = template.encode(messages, add_generation_prompt=False, continue_final_message=True)
    closed = template.encode(messages, add_generation_prompt=False)
    assert closed[: len(ids)] == ids and closed[len(ids):] == [tok.eos_id]  # only the end of turn is left out
    ref = reference(ids, 8)
    extra = {"add_generation_prompt": False, "continue_final_message": True, "ignore_eos": True}
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, extra_body=extra,
                                         temperature=0)
    assert out.choices[0].message.content == ref.text and out.usage.prompt_tokens == len(ids)
    echoed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                            extra_body={**extra, "echo": True}, temperature=0)
    assert echoed.choices[0].message.content == "Sure, here" + ref.text
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True,
                                            extra_body={**extra, "echo": True}, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Sure, here" + ref.text
    for bad in ({"continue_final_message": True},  # add_generation_prompt left at true
                {**extra, "messages": messages[:1]}):  # the last message is the user's
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=bad.pop("messages", messages), max_tokens=4,
                                           extra_body=bad)
        assert e.value.body["param"] in ("continue_final_message", "messages")


# ------------------------------------------------------------------------------------------------------
# errors: OpenAI's shape, 4xx, and the server keeps serving

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
# command line

def test_cli_keeps_or_dequantises_an_fp8_checkpoint(checkpoint, tmp_path):
    """``--fp8 keep|dequantize|auto`` for a checkpoint in the official FP8 layout: the engine line says which,
    and on the CPU (where kept weights are dequantised on the fly) both give the same text."""
    import shutil

    from test_checkpoint import write_fp8_checkpoint

    fp8 = tmp_path / "fp8"
    write_fp8_checkpoint(checkpoint, fp8)
    for f in checkpoint.iterdir():  # the tokenizer beside the weights
        if f.is_file() and not (fp8 / f.name).exists():
            shutil.copy(f, fp8 / f.name)
    out = {mode: run_cli("generate", str(fp8), "--prompt", "The quick", "--max-new-tokens", "6", "--threads", "1",
                         "--fp8", mode, "--no-echo", timeout=120) for mode in ("keep", "dequantize", "auto")}
    assert all(r.returncode == 0 for r in out.values()), [r.stderr[-500:] for r in out.values()]
    assert "FP8 weights kept" in out["keep"].stderr
    assert "FP8 weights kept" not in out["dequantize"].stderr + out["auto"].stderr  # auto: no Hopper GPU here
    assert out["keep"].stdout == out["dequantize"].stdout == out["auto"].stdout
    bad = run_cli("generate", str(fp8), "--prompt", "x", "--fp8", "yes", timeout=60)
    assert bad.returncode != 0 and "fp8 must be one of" in bad.stderr


def test_cli_generate_and_chat(checkpoint, loaded):
    _, tok = loaded
    r = run_cli("generate", str(checkpoint), "--prompt", "The quick", "--max-new-tokens", "6", "--threads", "1",
                timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The quick") and "tokens/s" in r.stderr
    spec = run_cli("generate", str(checkpoint), "--prompt", "The quick", "--max-new-tokens", "6", "--threads", "1",
                   "--speculative", "--num-speculative-tokens", "2", "--no-echo", timeout=120)
    assert spec.returncode == 0, spec.stderr
    assert r.stdout.endswith(spec.stdout) and "MTP drafts accepted" in spec.stderr  # greedy: the same text
    assert "by position" in spec.stderr and "accepted per step" in spec.stderr

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


def test_load_puts_the_model_on_the_gpu_when_there_is_one(checkpoint):
    import torch

    model, tok = dsv3.load(checkpoint)  # device="auto"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(model.parameters()).device.type == expected and not model.training
    assert tok.vocab_size == model.config.vocab_size
    half, _ = dsv3.load(checkpoint, "cpu", "bfloat16")
    gate = half.layers[1].mlp.gate
    assert half.embed_tokens.weight.dtype == torch.bfloat16 and gate.e_score_correction_bias.dtype == torch.float32
    with pytest.raises(dsv3.ConfigError, match="dtype"):
        dsv3.load(checkpoint, "cpu", "float64")


def test_cli_help_and_device_default(capsys):
    from dsv3.cli import build_parser

    for cmd in ("generate", "chat", "serve"):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([cmd, "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and "checkpoint" in out and "auto (the GPU when there is one" in out
    parse = build_parser().parse_args
    for argv in (["sample", "ck", "--prompt", "p"], ["generate", "ck", "--prompt", "p"], ["chat", "ck"],
                 ["serve", "ck"]):
        args = parse(argv)
        assert args.device == "auto" and args.dtype is None, argv
    args = parse(["serve", "ck", "--api-key", "k", "--port", "9", "--max-batch", "3", "--no-prefix-caching"])
    assert (args.api_key, args.port, args.max_batch, args.prefix_caching) == ("k", 9, 3, False)


def test_cli_serve(checkpoint):
    """`dsv3 serve` in a subprocess: loads the checkpoint, takes its API key from $DSV3_API_KEY, answers a chat
    request, logs it as a JSON line, stops on SIGTERM."""
    import os
    import subprocess
    import sys

    from conftest import SRC

    port = free_port()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "DSV3_API_KEY": "env-key"}
    proc = subprocess.Popen([sys.executable, "-m", "dsv3.cli", "serve", str(checkpoint), "--port", str(port),
                             "--model-name", "cli-model", "--max-batch", "2", "--log-level", "info"],
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
        hi = {"model": "cli-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=60).chat.completions.create(**hi)
        client = openai.OpenAI(base_url=url + "/v1", api_key="env-key", max_retries=0, timeout=60)
        out = client.chat.completions.with_raw_response.create(**hi, extra_headers={"X-Request-Id": "cli-req-1"})
        assert out.headers["x-request-id"] == "cli-req-1"
        reply = out.parse()
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 3
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=10)
    lines = [json.loads(line[line.index("{"):]) for line in err.splitlines() if '"request_id": "cli-req-1"' in line]
    assert len(lines) == 1, err
    assert lines[0]["route"] == "/v1/chat/completions" and lines[0]["status"] == 200
    assert lines[0]["completion_tokens"] == reply.usage.completion_tokens

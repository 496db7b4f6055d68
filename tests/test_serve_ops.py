"""The server's operations surface: /metrics, /tokenize and /detokenize, /version, the API key, request ids and
log lines, the four prompt forms of /v1/completions, unknown and invalid fields, and the OpenAPI schema."""

from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

pytest.register_assert_rewrite("serving")
from serving import GREEDY, MAX_SEQ_LEN, MODEL, error_of, make_engine, metric, running, scrape, wait_idle  # noqa: E402

import dsv3  # noqa: E402
from dsv3.inference.chat import ChatTemplate  # noqa: E402

pytest_plugins = ["serving"]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_metrics_follow_requests(server, client):
    url, engine = server
    wait_idle(engine)
    before = scrape(url)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert (name, (("model_name", MODEL),)) in before, name
    ids = list(range(5, 25))  # 20 tokens: two full pages of 8, cached by the first request
    for _ in range(2):
        out = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, **GREEDY)
        assert out.usage.completion_tokens == 5
    wait_idle(engine)
    after = scrape(url)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("vllm:prompt_tokens_total") == 40 and delta("vllm:generation_tokens_total") == 10
    assert delta("vllm:request_success_total", finished_reason="length") == 2
    assert delta("vllm:prefix_cache_queries_total") == 40 and delta("vllm:prefix_cache_hits_total") == 16
    for name in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:request_queue_time_seconds"):
        assert delta(name + "_count") == 2, name
        assert delta(name + "_sum") > 0, name
    assert delta("vllm:inter_token_latency_seconds_count") == 8  # 4 gaps between 5 tokens, one per step
    assert metric(after, "vllm:num_requests_running") == metric(after, "vllm:num_requests_waiting") == 0
    assert metric(after, "vllm:kv_cache_usage_perc") == 0  # idle cached pages count as free
    assert not any(name.startswith("vllm:spec_decode") for name, _ in after)  # not speculative


def test_speculative_metrics(loaded):
    from dsv3.server import create_app

    engine = make_engine(loaded, speculative=True)
    with running(create_app(engine, MODEL, num_threads=1)) as url:
        r = httpx.post(url + "/v1/completions", timeout=60, json={
            "prompt": [5, 6, 7, 8], "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12
        m = scrape(url)
    drafts = metric(m, "vllm:spec_decode_num_drafts_total")
    accepted = metric(m, "vllm:spec_decode_num_accepted_tokens_total")
    assert drafts > 0 and metric(m, "vllm:spec_decode_num_draft_tokens_total") == drafts
    assert 0 <= accepted <= drafts and 11 <= drafts + accepted <= 12  # a verify step: 1 + accepted tokens
    assert metric(m, "vllm:spec_decode_num_accepted_tokens_per_pos_total", position="0") == accepted


def test_tokenize_and_detokenize_round_trip(server, client, loaded):
    url, _ = server
    _, tok = loaded
    text = "Hello, how are you today?"
    r = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": text})
    body = r.json()
    assert r.status_code == 200 and body["tokens"] == tok.encode(text)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_SEQ_LEN
    out = client.completions.create(model=MODEL, prompt=text, max_tokens=1, **GREEDY)
    assert out.usage.prompt_tokens == body["count"]  # the ids the completion was fed
    back = httpx.post(url + "/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = httpx.post(url + "/tokenize", json={"model": MODEL, "messages": messages}).json()
    template = ChatTemplate(tok)
    assert chat["tokens"] == template.encode(messages) and chat["count"] == len(chat["tokens"])
    bare = httpx.post(url + "/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert bare["tokens"] == template.encode(messages, add_generation_prompt=False) != chat["tokens"]

    assert error_of(httpx.post(url + "/detokenize", json={"tokens": [10 ** 6]}))["param"] == "tokens"
    assert error_of(httpx.post(url + "/detokenize", json={"tokens": [-1]}))["param"] == "tokens"
    assert error_of(httpx.post(url + "/tokenize", json={"model": "other", "prompt": "x"}))["code"] == "model_not_found"
    assert error_of(httpx.post(url + "/tokenize", json={"prompt": 3}))["param"] == "prompt"
    assert error_of(httpx.post(url + "/tokenize", json={"messages": [{"role": "robot"}]}))["param"] == "messages"


def test_version_and_request_ids(server, client, caplog):
    url, _ = server
    assert httpx.get(url + "/version").json() == {"version": dsv3.__version__}
    caplog.set_level(logging.INFO, logger="dsv3.server")
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="The quick", max_tokens=3,
                                                      extra_headers={"X-Request-Id": "req-42"}, **GREEDY)
    assert raw.headers["x-request-id"] == "req-42" and raw.parse().id == "cmpl-req-42"
    made = httpx.get(url + "/v1/models").headers["x-request-id"]
    assert len(made) == 32 and made != "req-42"
    bad = httpx.get(url + "/v1/models", headers={"X-Request-Id": "no spaces allowed"}).headers["x-request-id"]
    assert bad != "no spaces allowed" and len(bad) == 32
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "dsv3.server" and "req-42" in r.getMessage()]
    assert len(lines) == 1
    line = lines[0]
    assert line["route"] == "/v1/completions" and line["status"] == 200 and line["finish_reason"] == "length"
    assert line["completion_tokens"] == 3 and line["prompt_tokens"] == raw.parse().usage.prompt_tokens
    assert line["cached_tokens"] == 0 and 0 < line["ttft_s"] <= line["e2e_s"]


def test_api_key(loaded):
    from dsv3.server import create_app

    with running(create_app(make_engine(loaded), MODEL, num_threads=1, api_key="sekret")) as url:
        ask = {"model": MODEL, "prompt": "fox", "max_tokens": 2}
        r = httpx.post(url + "/v1/completions", json=ask)
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        r = httpx.post(url + "/v1/completions", json=ask, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Basic c2VrcmV0"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0, timeout=60)
        assert good.completions.create(**ask).usage.completion_tokens <= 2
        assert [m.id for m in good.models.list().data] == [MODEL]
        for path in ("/health", "/metrics", "/version"):
            assert httpx.get(url + path).status_code == 200, path
        assert httpx.post(url + "/tokenize", json={"prompt": "fox"}).status_code == 200


def test_all_prompt_forms(client, reference):
    prompts = ["The quick brown", "Hello, how"]
    refs = [reference(p, 4) for p in prompts]
    one = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=4, **GREEDY)
    assert [c.text for c in one.choices] == [refs[0].text] and one.usage.prompt_tokens == refs[0].prompt_tokens

    token_lists = [list(range(5, 12)), list(range(40, 43))]
    id_refs = [reference(t, 4) for t in token_lists]
    for prompt, expected in ((prompts, refs), (token_lists[0], id_refs[:1]), (token_lists, id_refs)):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, n=2, **GREEDY)
        assert [c.index for c in out.choices] == list(range(2 * len(expected)))  # prompt index x n + sample
        assert [c.text for c in out.choices] == [r.text for r in expected for _ in range(2)]
        assert out.usage.prompt_tokens == sum(r.prompt_tokens for r in expected)  # each prompt once, not per choice
        assert out.usage.completion_tokens == 8 * len(expected)

    stream = client.completions.create(model=MODEL, prompt=token_lists, max_tokens=4, stream=True, **GREEDY)
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [r.text for r in id_refs]


def test_unknown_fields_ignored_and_invalid_values_named(server):
    url, _ = server
    post = lambda path, body: httpx.post(url + path, json=body, timeout=30)  # noqa: E731
    base = {"model": MODEL, "prompt": "fox", "max_tokens": 2}
    r = post("/v1/completions", {**base, "best_of": 3, "some_future_field": {"x": 1}, "priority": 0})
    assert r.status_code == 200, r.text
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi", "name": "me"}], "max_tokens": 2,
            "parallel_tool_calls": False, "metadata": {"a": "b"}}
    assert post("/v1/chat/completions", chat).status_code == 200
    for field, value in [("n", "x"), ("stream_options", {"include_usage": "maybe"}), ("top_k", -1),
                         ("prompt", [[1, 2], []]), ("prompt", [1, "a"]), ("ignore_eos", "perhaps"),
                         ("logprobs", 21), ("echo", "twice")]:
        r = post("/v1/completions", {**base, field: value})
        assert r.status_code == 400 and error_of(r)["param"] == field, (field, value, r.text)


def test_openapi_schema_has_the_response_models(server):
    url, _ = server
    schema = httpx.get(url + "/openapi.json").json()
    models = schema["components"]["schemas"]
    for name in ("CompletionRequest", "CompletionResponse", "ChatCompletionRequest", "ChatCompletionResponse",
                 "ModelList", "ModelCard", "ErrorResponse", "Usage", "TokenizeResponse", "DetokenizeResponse",
                 "VersionResponse", "HealthResponse", "CompletionLogprobs", "ChatLogprobs", "ChatTokenLogprob",
                 "TopLogprob"):
        assert name in models, name

    def ref(path, method="post", status="200"):
        return schema["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]["$ref"]

    assert ref("/v1/completions").endswith("/CompletionResponse")
    assert ref("/v1/chat/completions").endswith("/ChatCompletionResponse")
    assert ref("/v1/completions", status="400").endswith("/ErrorResponse")
    assert ref("/v1/models", "get").endswith("/ModelList")
    assert ref("/tokenize").endswith("/TokenizeResponse") and ref("/version", "get").endswith("/VersionResponse")
    assert "Usage" in json.dumps(models["CompletionResponse"])
    assert "CompletionLogprobs" in json.dumps(models["CompletionChoice"])
    request = models["CompletionRequest"]["properties"]
    assert {"logprobs", "echo", "logit_bias", "presence_penalty", "min_tokens", "stop_token_ids"} <= set(request)

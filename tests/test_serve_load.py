"""Many concurrent clients: streams that complete, streams dropped midway, a non-streaming request dropped;
afterwards the cache is empty, the server healthy and its metrics account for every request."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

pytest.register_assert_rewrite("serving")
from serving import MAX_SEQ_LEN, MODEL, TEXT, metric, scrape, slowed, wait_idle  # noqa: E402

pytest_plugins = ["serving"]
pytestmark = pytest.mark.usefixtures("one_thread")

CLIENTS = 64


def test_64_streams_a_quarter_dropped_midway(server, reference):
    url, engine = server
    prompts = [TEXT[i % 4][: 8 + (i * 7) % 30] for i in range(CLIENTS)]
    max_tokens = [4 + i % 9 for i in range(CLIENTS)]
    dropped = {i for i in range(CLIENTS) if i % 4 == 1}  # close these streams after their second chunk
    for i in dropped:
        max_tokens[i] = 40  # still running when closed
    expected = {i: reference(prompts[i], max_tokens[i]) for i in range(CLIENTS) if i not in dropped}

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
                if i in dropped and chunks >= 2:
                    return text, reason, False  # leaving the block closes the connection mid-stream
        return text, reason, False

    async def main():
        limits = httpx.Limits(max_connections=CLIENTS + 8, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(CLIENTS))), 240)

    before = scrape(url)
    with slowed(engine) as cancelled:
        outcomes = asyncio.run(main())
        wait_idle(engine)
    assert len(cancelled) == len(dropped) == CLIENTS // 4
    for i, (text, reason, done) in enumerate(outcomes):
        if i in dropped:
            assert not done
        else:
            assert done and reason == "length", (i, reason)
            assert text == expected[i].text, i
    wait_idle(engine)
    assert engine.cache.num_free_slots == engine.max_batch and not engine.scheduler.running

    health = httpx.get(url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["pending"] == 0 and health["running"] == 0
    assert health["free_pages"] == health["num_pages"] and health["last_error"] is None
    after = scrape(url)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("vllm:request_success_total", finished_reason="length") == CLIENTS - len(dropped)
    assert delta("vllm:request_success_total", finished_reason="abort") == len(dropped)
    assert metric(after, "vllm:num_requests_running") == metric(after, "vllm:kv_cache_usage_perc") == 0

    # a non-streaming request dropped by its client is cancelled as well
    with slowed(engine) as cancelled:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", timeout=0.3, json={
                "model": MODEL, "prompt": "fox", "max_tokens": MAX_SEQ_LEN - 4, "temperature": 0, "ignore_eos": True})
        wait_idle(engine)
        assert len(cancelled) == 1
    assert httpx.get(url + "/health", timeout=10).json()["pending"] == 0

"""bench/serve.py end to end on the CPU: a tiny random-weight server in a child process, streaming clients at two
concurrencies, and a table whose numbers add up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytest.importorskip("httpx")

from conftest import torchrun_env  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "bench" / "serve.py"


def test_bench_serve_tiny(tmp_path):
    out = tmp_path / "bench.json"
    n, input_len, output_len = 8, 48, 6
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--preset", "tiny", "--random-weights", "--device", "cpu", "--threads", "1",
         "--input-len", str(input_len), "--output-len", str(output_len), "--num-prompts", str(n),
         "--max-concurrency", "1,4", "--max-batch", "4", "--shared-prefix", "32", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=torchrun_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| concurrency |" in proc.stdout and "TTFT" in proc.stdout
    runs = json.loads(out.read_text())["runs"]
    assert [r["max_concurrency"] for r in runs] == [1, 4]
    for r in runs:
        assert r["successful"] == n and r["failed"] == 0, r["errors"]
        assert r["input_tokens"] == n * input_len and r["output_tokens"] == n * output_len  # exact lengths
        assert r["output_tokens_per_s"] > 0 and r["total_tokens_per_s"] > r["output_tokens_per_s"]
        for key in ("ttft_ms", "tpot_ms", "itl_ms"):
            s = r[key]
            assert 0 < s["p50"] <= s["p99"] and s["mean"] > 0, (key, s)
        # the 32 shared tokens fill two pages of 16; the second's key includes the next (random) token: one hit
        assert r["cached_tokens"] == n * 16 and r["prefix_cache_hit_rate"] == pytest.approx(16 / input_len)
        assert r["spec_acceptance"] is None  # not speculative

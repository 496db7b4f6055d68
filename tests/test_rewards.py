"""GRPO rewards (posttrain/rewards.py) and the code sandbox (posttrain/sandbox.py)."""

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dsv3.posttrain.rewards import (BoxedAnswerReward, CallableReward, CodeReward, HTTPReward, TaskReward,
                                    extract_code, make_reward)
from dsv3.posttrain.sandbox import Limits, run_python
from dsv3.posttrain.tasks import FORMAT_REWARD, ArithmeticTask


def test_boxed_right_wrong_missing_nested():
    reward = BoxedAnswerReward(format_reward=0.25)
    completions = [
        "so 12 + 30 = \\boxed{42}",                     # right
        "\\boxed{41}",                                  # wrong but well formed
        "the answer is 42",                             # no box
        "first \\boxed{7}, finally \\boxed{\\frac{84}{2}}",  # nested braces: the last box, read whole
        "\\boxed{1,000}",                               # formatting does not matter
        "\\boxed{42",                                   # unclosed
    ]
    answers = ["42", "42", "42", "42", "1000", "42"]
    assert reward([""] * 6, completions, answers) == [1.0, 0.25, 0.0, 0.25, 1.0, 0.0]
    assert BoxedAnswerReward()(["p"], ["\\boxed{41}"], ["42"]) == [0.0]
    assert BoxedAnswerReward()(["p"], ["\\boxed{42}"], [None]) == [0.0]
    with pytest.raises(ValueError, match="length"):
        reward(["p"], ["a", "b"], ["1", "2"])


def test_task_reward_is_the_default():
    task = ArithmeticTask()
    p = task.problem(0)
    reward = make_reward(None, task)
    assert isinstance(reward, TaskReward)
    right, wrong = task.solution(p), "\\boxed{-99999}"
    assert reward([p.prompt] * 3, [right, wrong, "no box"], [p.answer] * 3) == [1.0, FORMAT_REWARD, 0.0]


def test_make_reward_specs(tmp_path, monkeypatch):
    assert isinstance(make_reward("boxed", None), BoxedAnswerReward)
    assert isinstance(make_reward("code", None), CodeReward)
    http = make_reward("https://example.invalid/score", None)
    assert isinstance(http, HTTPReward) and http.url == "https://example.invalid/score"
    (tmp_path / "my_rewards_a.py").write_text("def f(p, c, a):\n    return [1.0] * len(c)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(make_reward("my_rewards_a:f", None), CallableReward)
    for bad in ("nonsense", "ftp://x"):
        with pytest.raises(ValueError, match="reward spec"):
            make_reward(bad, None)
    with pytest.raises(ValueError, match="task"):
        make_reward(None, None)


def test_extract_code():
    text = "Here:\n```cpp\nint x;\n```\nthen\n```python\ndef f():\n    return 1\n```\nand\n```py\ndef g(): pass\n```\n"
    assert extract_code(text) == "def g(): pass\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\nx = 1\n```\n```\ny = 2\n```") == "x = 1\n"  # tagged beats untagged
    assert extract_code("x = 1") == "x = 1"


SOLUTION = "```python\ndef add(a, b):\n    return a + b\n```"
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def test_code_reward_batch():
    # One batch, run in parallel: every case but the loop ends at once, the loop after the 2 s wall timeout.
    cases = {
        "passes": (SOLUTION, TESTS, 1.0),
        "fails an assert": ("```python\ndef add(a, b):\n    return a - b\n```", TESTS, 0.0),
        "raises": ("```python\ndef add(a, b):\n    raise RuntimeError('no')\n```", TESTS, 0.0),
        "loops forever": ("```python\nwhile True:\n    pass\n```", TESTS, 0.0),
        "allocates 8 GB": ("```python\nx = bytearray(8 * 2**30)\ndef add(a, b): return a + b\n```", TESTS, 0.0),
        "opens a socket": ("```python\nimport socket\nsocket.socket()\ndef add(a, b): return a + b\n```", TESTS, 0.0),
        "connects": ("```python\nimport socket\nsocket.create_connection(('127.0.0.1', 9))\n"
                     "def add(a, b): return a + b\n```", TESTS, 0.0),
        "exits before the tests": ("```python\nimport sys\nsys.exit(0)\n```", TESTS, 0.0),
        "os._exit before the tests": ("```python\nimport os\nos._exit(0)\n```", TESTS, 0.0),
        "no tests": (SOLUTION, None, 0.0),
    }
    reward = CodeReward(timeout=2.0, workers=len(cases))
    start = time.monotonic()
    got = reward([""] * len(cases), [c[0] for c in cases.values()], [c[1] for c in cases.values()])
    elapsed = time.monotonic() - start
    assert dict(zip(cases, got)) == {k: v[2] for k, v in cases.items()}
    assert elapsed < 5, elapsed
    results = dict(zip(cases, reward.last_results))
    assert results["loops forever"].timed_out and results["loops forever"].seconds < 4
    assert "MemoryError" in results["allocates 8 GB"].stderr
    assert "network access is disabled" in results["opens a socket"].stderr
    assert "network access is disabled" in results["connects"].stderr
    assert "AssertionError" in results["fails an assert"].stderr
    assert results["exits before the tests"].returncode == 0 and not results["exits before the tests"].passed


def test_sandbox_environment_and_output(tmp_path):
    code = ("import os, sys\nprint(sorted(os.environ))\nprint(os.getcwd())\nprint('site' in sys.modules)\n"
            "print('x' * 10000)\n")
    result = run_python(code, max_output=500)
    assert result.passed
    lines = result.stdout.splitlines()
    assert lines[0] in ("['PATH']", "['LC_CTYPE', 'PATH']")  # the interpreter may set LC_CTYPE itself
    assert os.path.basename(lines[1]) == "work" and lines[1] != os.getcwd()
    assert lines[2] == "False"
    assert len(result.stdout) == 500
    assert not os.path.exists(lines[1])  # the temporary directory is gone


@pytest.mark.skipif(not hasattr(os, "fork") or os.geteuid() == 0, reason="RLIMIT_NPROC does not bind root")
def test_sandbox_no_fork():
    assert not run_python("import os\nos.fork()\n", limits=Limits(processes=1)).passed


def test_callable_reward(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_b.py").write_text(
        "def length(prompts, completions, answers):\n    return [float(len(c)) for c in completions]\n"
        "def short(prompts, completions, answers):\n    return [1.0]\n"
        "def words(prompts, completions, answers):\n    return ['1'] * len(completions)\n"
        "NOT_CALLABLE = 3\n"
        "class Scorer:\n    @staticmethod\n    def score(p, c, a):\n        return [0.5] * len(c)\n")
    (tmp_path / "my_rewards_broken.py").write_text("raise RuntimeError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert CallableReward.from_spec("my_rewards_b:length")(["p", "q"], ["ab", "c"], [None, "x"]) == [2.0, 1.0]
    assert CallableReward.from_spec("my_rewards_b:Scorer.score")(["p"], ["c"], [None]) == [0.5]
    for spec, message in [("no_such_module_xyz:f", "cannot import"), ("my_rewards_broken:f", "broken at import"),
                          ("my_rewards_b:missing", "no attribute"), ("my_rewards_b:NOT_CALLABLE", "not callable"),
                          ("my_rewards_b", "module:function"), (":f", "module:function")]:
        with pytest.raises(ValueError, match=message) as e:
            CallableReward.from_spec(spec)
        assert spec in str(e.value)
    with pytest.raises(ValueError, match="my_rewards_b:short.*list of 2 floats"):
        CallableReward.from_spec("my_rewards_b:short")(["p", "q"], ["a", "b"], [None, None])
    with pytest.raises(ValueError, match="my_rewards_b:words.*not a finite number"):
        CallableReward.from_spec("my_rewards_b:words")(["p"], ["a"], [None])


class _Handler(BaseHTTPRequestHandler):
    mode = "ok"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.server.mode == "error":
            self.send_error(503, "overloaded")
            return
        if self.server.mode == "garbage":
            payload = b"not json"
        elif self.server.mode == "short":
            payload = b'{"rewards": []}'
        else:
            rewards = [float(len(c)) + (a == "bonus") for c, a in zip(body["completions"], body["answers"])]
            payload = json.dumps({"rewards": rewards}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.mode = "ok"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_http_reward(server):
    url = f"http://127.0.0.1:{server.server_address[1]}/score"
    reward = make_reward(url, None)
    assert reward(["p", "q"], ["abc", "d"], [None, "bonus"]) == [3.0, 2.0]
    server.mode = "error"
    with pytest.raises(RuntimeError, match=f"{url}: HTTP 503"):
        reward(["p"], ["a"], [None])
    server.mode = "garbage"
    with pytest.raises(ValueError, match=url):
        reward(["p"], ["a"], [None])
    server.mode = "short"
    with pytest.raises(ValueError, match=f"{url}: expected a list of 1 floats"):
        reward(["p"], ["a"], [None])
    closed = f"http://127.0.0.1:{server.server_address[1]}/x"
    server.shutdown()
    server.server_close()
    with pytest.raises(RuntimeError, match="reward service http://127.0.0.1"):
        HTTPReward(closed, timeout=2)(["p"], ["a"], [None])

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv3

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_cli(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run ``dsv3 ARGS`` from this checkout's sources (not whatever dsv3 is installed)."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "dsv3.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


@pytest.fixture(scope="module")
def one_thread():
    """Decode runs many tiny matmuls: one intra-op thread is much faster than two fighting (and than two on a
    busy machine). Modules of engine tests use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TORCHRUN_TIMEOUT = 240
"""Seconds any one torchrun job of the tests may take."""


def torchrun_env() -> dict:
    """This checkout's sources, one intra-op thread per rank (the ranks share the CPU)."""
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def torchrun_cmd(nproc: int, *args: str, script: str | None = None) -> list[str]:
    """``torchrun --nproc_per_node nproc -m dsv3 train ARGS`` (or ``script train ARGS``)."""
    target = [script] if script else ["-m", "dsv3"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target,
            "train", *args]


def torchrun(nproc: int, *args: str, script: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(nproc, *args, script=script), capture_output=True, text=True,
                          timeout=TORCHRUN_TIMEOUT, env=torchrun_env())


def make_corpus(root) -> "Path":
    """30 documents of random words, the same every time."""
    root.mkdir(parents=True, exist_ok=True)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    g = torch.Generator().manual_seed(0)
    for i in range(30):
        idx = torch.randint(0, len(words), (400,), generator=g).tolist()
        (root / f"doc{i:02d}.txt").write_text(" ".join(words[j] for j in idx) + "\n")
    return root


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, reference: Path, rel: float = 1e-4, steps: int = 10) -> None:
    """Per-step losses within ``rel``; expert loads, and the exported routing biases, identical; each exported
    weight within 1e-4 of the reference's (in norm)."""
    a, b = records(run), records(reference)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):
        for key in ("loss", "mtp_loss", "grad_norm", "val_loss"):
            if key in rb:
                assert ra[key] == pytest.approx(rb[key], rel=rel), (ra["step"], key)
        assert ra["expert_load"] == rb["expert_load"], ra["step"]
    ma = dsv3.load_pretrained(run / "export", dtype=torch.float32).state_dict()
    mb = dsv3.load_pretrained(reference / "export", dtype=torch.float32).state_dict()
    biases = [k for k in mb if k.endswith("e_score_correction_bias")]
    assert biases and all(torch.equal(ma[k], mb[k]) for k in biases)
    assert any(mb[k].abs().sum() > 0 for k in biases)  # the biases moved
    for k in mb:  # AdamW's normalised steps amplify rounding on weights with tiny gradients: compare norms
        assert (ma[k] - mb[k]).norm() <= 1e-4 * mb[k].norm() + 1e-6, k


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def model():
    """The ``tiny`` preset with seed 0 (the engine tests' model; a module may define its own)."""
    return dsv3.build_model("tiny", seed=0)


def rand_tokens(n: int, seed: int) -> list[int]:
    """``n`` random token ids of the ``tiny`` vocabulary (above the special ids), reproducible by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 4096, (n,), generator=g).tolist()


@contextlib.contextmanager
def host_reads(monkeypatch):
    """The files whose code reads a tensor back to the host (``Tensor.tolist``) inside the block; the
    test's patches are undone at its end."""
    tolist, reads = torch.Tensor.tolist, []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: (reads.append(sys._getframe(1).f_code.co_filename),
                                                           tolist(t))[1])
    try:
        yield reads
    finally:
        monkeypatch.undo()

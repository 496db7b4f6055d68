"""`dsv3 train` under torchrun on the CPU (gloo): data and expert parallelism against one process, sharded
checkpoints, resume after kill -9, loading at another world size, a failing rank.

Every run trains the same small model on the same global batches (batch 8, no batch ramp), so the per-step
numbers of a parallel run must be those of the one-process run. Each torchrun has a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dsv3
from conftest import TORCHRUN_TIMEOUT as TIMEOUT
from conftest import assert_same_run, make_corpus, records, torchrun, torchrun_cmd
from conftest import torchrun_env as env

ARGS = ["--vocab-size", "300", "--steps", "10", "--seq-len", "32", "--batch-size", "8", "--micro-batch-size", "2",
        "--eval-every", "5", "--save-every", "5", "--device", "cpu", "--set", "batch_ramp=false",
        "--set", "sample_tokens=4", "--set", "model.num_hidden_layers=2", "--set", "model.hidden_size=64"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The corpus, a shared cache, and the one-process reference run (one thread, as each torchrun rank)."""
    root = tmp_path_factory.mktemp("dist")
    corpus = make_corpus(root / "corpus")
    common = ["--data", str(corpus), "--cache-dir", str(root / "cache"), *ARGS]
    ref = subprocess.run([sys.executable, "-m", "dsv3", "train", *common, "--out", str(root / "one")],
                         capture_output=True, text=True, timeout=TIMEOUT, env=env())
    assert ref.returncode == 0, ref.stderr[-3000:]
    return root, common


@pytest.fixture(scope="module")
def launch(setup):
    """``launch(name, nproc, *flags)``: the torchrun run ``name`` (run once, shared by the tests that read it)."""
    root, common = setup
    done: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}

    def get(name: str, nproc: int, *extra: str) -> tuple[Path, subprocess.CompletedProcess]:
        if name not in done:
            out = root / name
            proc = torchrun(nproc, *common, *extra, "--out", str(out))
            assert proc.returncode == 0, proc.stderr[-3000:]
            done[name] = (out, proc)
        return done[name]

    return get


@pytest.mark.parametrize("name, nproc, extra", [("dp2", 2, []), ("dp4", 4, []), ("zero1-dp2", 2, ["--dp-shard", "zero1"])])
def test_data_parallel_matches_one_process(setup, launch, name, nproc, extra):
    root, _ = setup
    out, proc = launch(name, nproc, *extra)
    assert_same_run(out, root / "one")
    assert "validation loss" in proc.stdout and proc.stdout.count("run directory") == 1  # rank 0 reports
    meta = json.loads((out / "checkpoints" / "step_0000010" / "meta.json").read_text())
    assert meta["backend"] == "dcp" and meta["world_size"] == nproc


@pytest.mark.parametrize("nproc", [2, 4], ids=["ep2-dp2", "ep2-dp4"])
def test_expert_parallel_matches_one_process(setup, launch, nproc):
    """Each rank holds half of every MoE layer's experts (the checkpoint's expert shards are half-size), and the
    run is the one-process run. On 4 ranks two ranks hold the same experts and FSDP2 shards them along their rows
    between the two: quarter blocks."""
    from torch.distributed.checkpoint import FileSystemReader

    root, _ = setup
    out, proc = launch(f"ep2-dp{nproc}", nproc, "--ep", "2")
    assert_same_run(out, root / "one")
    assert ("experts sharded by FSDP2 over the 2 ranks holding them" if nproc == 4
            else "each rank's experts its own") in proc.stdout
    metadata = FileSystemReader(str(out / "checkpoints" / "step_0000010")).read_metadata()
    experts = [k for k in metadata.state_dict_metadata if k.endswith("experts.gate_up_proj")]
    assert experts
    column = nproc // 2
    for key in experts + [f"optim.{k[len('model.'):]}.exp_avg" for k in experts]:
        md = metadata.state_dict_metadata[key]
        half, rows = md.size[0] // 2, md.size[1] // column
        assert sorted((c.offsets[0], c.offsets[1]) for c in md.chunks) == [
            (e, r) for e in (0, half) for r in range(0, md.size[1], rows)], key
        assert all(tuple(c.sizes[:2]) == (half, rows) for c in md.chunks), key


def test_node_limited_routing_on_four_nodes_of_one_rank(setup, launch):
    """EP 4 with --node-limited, each rank counted as a node: the tiny model's 4 routing groups land one per
    node, so a token's 4 copies reach at most topk_group = 2 nodes, as recorded; and the run is the one-process
    run (also in steps where a rank's experts get no token at all: they still take their AdamW step)."""
    root, _ = setup
    out, proc = launch("ep4-node-limited", 4, "--ep", "4", "--node-limited", "--ranks-per-node", "1")
    assert_same_run(out, root / "one")
    assert "4 routing group(s), 2 kept: a token reaches at most 2 node(s), each group on one node" in proc.stdout
    for r in records(out):
        assert 1.0 <= r["ep_nodes_per_token"] <= 2.0 and r["ep_ranks_per_token"] == r["ep_nodes_per_token"]
    # without the node limit in the routing (groups of 8 experts over ranks of 4) the check refuses the layout
    from dsv3.train.node_limited import ExpertPlacement

    with pytest.raises(ValueError, match="routing group of 8 experts"):
        ExpertPlacement(16, 2, 1, 4, (0, 1, 2, 3), 1).check_node_limited()


def test_zero1_with_expert_parallelism_and_its_checkpoint_on_fewer_ranks(setup, launch):
    """ZeRO-1 with --ep 2 on 4 ranks: the dense AdamW states are sharded over the 4 data-parallel ranks, each
    expert's over the 2 ranks holding it (two ZeroRedundancyOptimizers), and the run is the one-process run.
    Its step-5 checkpoint continues on 2 ranks (FSDP2, EP 2: resharded 4 -> 2) as the one-process run."""
    from torch.distributed.checkpoint import FileSystemReader

    root, common = setup
    out, _ = launch("zero1-ep2-dp4", 4, "--dp-shard", "zero1", "--ep", "2")
    assert_same_run(out, root / "one")
    metadata = FileSystemReader(str(out / "checkpoints" / "step_0000010")).read_metadata()
    states = [k for k in metadata.state_dict_metadata if k.endswith("experts.gate_up_proj.exp_avg")]
    assert states  # every expert's state written, once (by its owner in the column), as two halves of the experts
    for key in states:
        md = metadata.state_dict_metadata[key]
        assert sorted((c.offsets[0], c.sizes[0]) for c in md.chunks) == [(0, md.size[0] // 2), (md.size[0] // 2, md.size[0] // 2)]

    fewer = root / "zero1-ep2-dp4-on-2"
    shutil.copytree(out, fewer)
    shutil.rmtree(fewer / "checkpoints" / "step_0000010")
    (fewer / "checkpoints" / "latest").unlink(missing_ok=True)
    resumed = torchrun(2, *common, "--out", str(fewer), "--resume", "--ep", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout and "step 5" in resumed.stdout
    assert_same_run(fewer, root / "one")


def test_kill_and_resume_under_torchrun_and_in_one_process(setup, launch):
    """kill -9 of the whole expert-parallel torchrun job after a checkpoint; --resume under torchrun finishes the
    run as if uninterrupted. The same sharded checkpoint also resumes in one process (2 ranks -> 1, the experts
    reassembled, without repeating --ep: the layout is the launch's)."""
    root, common = setup
    uninterrupted, _ = launch("ep2-dp2", 2, "--ep", "2")
    out = root / "killed"
    proc = subprocess.Popen(torchrun_cmd(2, *common, "--ep", "2", "--set", "save_every=1", "--out", str(out)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env(), start_new_session=True)
    deadline = time.time() + TIMEOUT
    ckpts = out / "checkpoints"
    while time.time() < deadline and not (ckpts / "step_0000003").is_dir():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    done = sorted(p.name for p in ckpts.glob("step_*"))
    assert done and done[-1] < "step_0000010", done  # killed before the end
    shutil.copytree(out, root / "killed-copy")
    resumed = torchrun(2, *common, "--out", str(out), "--resume", "--ep", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, uninterrupted)
    a, b = records(out), records(uninterrupted)
    assert all(ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"] for ra, rb in zip(a, b))
    # 2 ranks -> 1 process: the sharded checkpoint (model, experts and AdamW states) continues in one process
    one = subprocess.run([sys.executable, "-m", "dsv3", "train", *common, "--out", str(root / "killed-copy"),
                          "--resume"], capture_output=True, text=True, timeout=TIMEOUT, env=env())
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_run(root / "killed-copy", root / "one")


DYING_MID_SAVE = """
import os, signal, sys
import dsv3.train.dcp_state as dcp_state
from dsv3.cli import main

save_dcp = dcp_state.save_dcp

def dying_save(directory, *args):
    save_dcp(directory, *args)  # this rank's shards of step 6 are on disk, the checkpoint is not complete
    if os.environ["RANK"] == "1" and "step_0000006" in str(directory):
        os.kill(os.getpid(), signal.SIGKILL)

dcp_state.save_dcp = dying_save
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint(setup, launch, tmp_path):
    """kill -9 of one rank while the ranks write checkpoint 6: the job ends, step 3 stays the latest complete
    checkpoint, and --resume from it (past the half-written step 6) finishes as the uninterrupted run, bitwise."""
    root, common = setup
    uninterrupted, _ = launch("ep2-dp2", 2, "--ep", "2")
    script = tmp_path / "dying.py"
    script.write_text(DYING_MID_SAVE)
    out = tmp_path / "run"
    killed = torchrun(2, *common, "--ep", "2", "--set", "save_every=3", "--out", str(out), script=str(script))
    assert killed.returncode != 0
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000003"]
    assert list(ckpts.glob(".tmp-step_0000006*"))  # what the dead rank's job left half-written
    resumed = torchrun(2, *common, "--ep", "2", "--set", "save_every=3", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 3" in resumed.stdout
    a, b = records(out), records(uninterrupted)
    assert [r["step"] for r in a] == list(range(1, 11))
    assert all(ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"] for ra, rb in zip(a, b))
    assert not list(ckpts.glob(".tmp-*"))  # cleaned up by the next complete save


def test_export_of_a_sharded_run_loads_in_transformers(launch, tmp_path):
    transformers = pytest.importorskip("transformers")
    run, _ = launch("ep2-dp2", 2, "--ep", "2")
    out = tmp_path / "exported"
    r = subprocess.run([sys.executable, "-m", "dsv3", "export", str(run), str(out)],
                       capture_output=True, text=True, timeout=TIMEOUT, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    ours = dsv3.load_pretrained(out, dtype=torch.float32).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, ours.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert (ours(tokens).logits - theirs(tokens).logits).abs().max() < 1e-4
    reference = dsv3.load_pretrained(run / "export", dtype=torch.float32).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in ours.state_dict().items())


FAILING = """
import os, sys
import dsv3.train.trainer as trainer
from dsv3.cli import main

step = trainer.Trainer.step

def failing_step(self):
    if os.environ["RANK"] == "1" and self.step_count == 2:
        raise RuntimeError("simulated failure on rank 1")
    return step(self)

trainer.Trainer.step = failing_step
sys.exit(main(sys.argv[1:]))
"""


def test_a_failing_rank_ends_the_job_with_its_message(setup, tmp_path):
    root, common = setup
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    t0 = time.time()
    proc = torchrun(2, *common, "--out", str(tmp_path / "run"), script=str(script))
    assert proc.returncode != 0
    assert "simulated failure on rank 1" in proc.stderr
    assert time.time() - t0 < TIMEOUT / 2  # ended, not hung until the timeout


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [[], ["--dp-shard", "zero1"], ["--fp8"]], ids=["fsdp", "zero1", "fp8"])
def test_gpu_torchrun_world_of_one_starts_as_one_process(setup, tmp_path, extra):
    """On a GPU: `torchrun --nproc_per_node 1` (NCCL; the model built on the meta device and materialised on
    CUDA, FSDP2 or ZeRO-1, FP8 backends settled for CUDA) gives the first step of the one-process CUDA run."""
    root, common = setup
    args = [a if a != "cpu" else "cuda" for a in common] + ["--steps", "3", *extra]
    one = subprocess.run([sys.executable, "-m", "dsv3", "train", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=TIMEOUT, env=env())
    assert one.returncode == 0, one.stderr[-3000:]
    proc = torchrun(1, *args, "--out", str(tmp_path / "tr"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = records(tmp_path / "one"), records(tmp_path / "tr")
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-5) and a[0]["expert_load"] == b[0]["expert_load"]
    if "--fp8" in extra:
        assert "on emulate" not in proc.stdout  # the real FP8 GEMMs, chosen for CUDA while still on meta

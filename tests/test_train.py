"""Trainer: schedules, balancing, MTP targets, exact resume, checkpoint errors, the default CLI path."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3.checkpoint import CheckpointError
from dsv3.config import ConfigError
from dsv3.model import BalanceLoss, MoE, batch_balance_loss, sequence_balance_loss
from dsv3.train import Schedules, TrainConfig, train
from dsv3.train.balance import max_violation, moe_gates, update_bias
from dsv3.train.batch import IGNORE_INDEX, TrainBatch
from dsv3.train.step import cross_entropy_sum

from conftest import SRC, make_corpus, run_cli


# ---------------------------------------------------------------------------------------------- schedules
def test_paper_schedule_breakpoints_at_full_scale():
    s = Schedules.paper(14.8e12, peak_lr=2.2e-4, warmup_tokens=2000 * 15360 * 4096, batch_size=15360)
    assert s.lr(0) == 0
    assert s.lr(s.warmup_tokens / 2) == pytest.approx(1.1e-4)
    assert s.lr(5e12) == pytest.approx(2.2e-4)
    assert s.lr(10e12 - 1) == pytest.approx(2.2e-4)
    assert s.lr(10e12 + 4.3e12 / 2) == pytest.approx(2.2e-4 * (0.1 + 0.9 * 0.5))  # cosine midpoint
    assert s.lr(14.3e12 - 1) == pytest.approx(2.2e-5, rel=1e-6)
    assert s.lr(14.3e12 + 1e9) == pytest.approx(2.2e-5)
    assert s.lr(14.3e12 + 333e9 + 1e9) == pytest.approx(7.3e-6)
    assert s.batch_size(0) == 3072 and s.batch_size(469e9) == 15360
    assert s.batch_size(469e9 / 2) == (3072 + 15360) // 2
    assert s.bias_update_speed(14.3e12 - 1) == 0.001 and s.bias_update_speed(14.3e12) == 0
    assert s.mtp_weight(10e12 - 1) == 0.3 and s.mtp_weight(10e12) == 0.1


def test_schedule_scales_to_a_small_run():
    big, small = Schedules.paper(14.8e12), Schedules.paper(1e6)
    for frac in (0.1, 0.5, 0.7, 0.9, 0.97, 0.99):
        assert small.lr(frac * 1e6) / small.peak_lr == pytest.approx(big.lr(frac * 14.8e12) / big.peak_lr)
    assert small.batch_size(0, multiple=4) % 4 == 0


# ---------------------------------------------------------------------------------------------- balancing
def test_bias_update_rule():
    model = dsv3.build_model("tiny")
    gates = moe_gates(model)
    assert len(gates) == model.config.n_moe_layers + model.config.num_nextn_predict_layers
    loads = [torch.arange(16.0) for _ in gates]  # mean 7.5: experts 0-7 under, 8-15 over
    update_bias(gates, loads, gamma=0.01)
    b = gates[0].e_score_correction_bias
    assert torch.allclose(b[:8], torch.full((8,), 0.01)) and torch.allclose(b[8:], torch.full((8,), -0.01))
    update_bias(gates, [torch.full((16,), 5.0) for _ in gates], gamma=0.01)  # balanced: no change
    assert torch.allclose(gates[0].e_score_correction_bias[:8], torch.full((8,), 0.01))
    assert max_violation(torch.tensor([1.0, 1.0, 4.0, 2.0])) == pytest.approx((4 - 2) / 2)


def test_balance_losses_hand_computed():
    """4 experts, K=2, T=2, two sequences. Each sequence alone is unbalanced (f = [2,1,1,0] and [0,1,1,2]), the
    batch as a whole is balanced: the sequence-wise loss sees it, the batch-wise (ablation) loss does not."""
    indices = torch.tensor([[0, 1], [0, 2], [3, 1], [3, 2]])  # sequence-major: tokens 0-1, then 2-3
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 2 + [[0.1, 0.2, 0.3, 0.4]] * 2)
    # per sequence f = 4 / (2 * 2) * counts; sum f * P = 0.8 + 0.3 + 0.2 = 1.3 and 0.3 + 0.2 + 0.8 = 1.3
    torch.testing.assert_close(sequence_balance_loss(probs, indices, n_seqs=2), torch.tensor(1.3))
    # batch: f = 4 / (2 * 4) * [2, 2, 2, 2] = 1, P = mean over the tokens = 0.25 each: sum = 1.0
    torch.testing.assert_close(batch_balance_loss(probs, indices), torch.tensor(1.0))


def test_balance_loss_acts_through_the_layer_output():
    """The attached loss adds weight * d(loss) to the gradients, changes nothing forward, and records its value;
    in eval mode it does nothing."""
    torch.manual_seed(0)
    layer = MoE(dsv3.preset("tiny").replace(hidden_size=32, moe_intermediate_size=16))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 8, 32)
    y_plain = layer(x)
    layer.gate.weight.grad = None
    layer(x).square().sum().backward()
    plain_grad = layer.gate.weight.grad.clone()
    layer.balance_loss = BalanceLoss("sequence")
    layer.balance_loss.weight.fill_(0.5)
    layer.gate.weight.grad = None
    y = layer(x)
    torch.testing.assert_close(y, y_plain)
    y.square().sum().backward()
    # the same gradient by hand: the loss of eq. 17-20 from the gate's own outputs
    layer.gate.weight.grad, attached = None, layer.gate.weight.grad.clone()
    _, indices, scores = layer.gate(x.view(-1, 32))
    expected = sequence_balance_loss(scores / scores.sum(-1, keepdim=True), indices, n_seqs=2)
    (0.5 * expected).backward()
    torch.testing.assert_close(attached, plain_grad + layer.gate.weight.grad)
    assert layer.balance_loss.total.item() == pytest.approx(0.5 * expected.item())
    layer.eval()
    layer.balance_loss.total.zero_()
    layer(x)
    assert layer.balance_loss.total.item() == 0


def test_batches_label_each_position_with_the_next_token():
    """labels[:, i] = tokens[:, i + 1]; MTP depth k's targets are t_{i+k+1} (report eq. 24)."""
    window = torch.arange(2 * 9).view(2, 9)  # S = 6, depth 2
    batch = TrainBatch.from_window(window, seq_len=6)
    assert batch.depth == 2 and torch.equal(batch.inputs, window[:, :6])
    assert torch.equal(batch.future_tokens, window[:, 6:8])
    for k in range(3):
        assert torch.equal(batch.targets(k), window[:, 1 + k : 7 + k])
    batch.labels[0, :3] = IGNORE_INDEX  # e.g. an SFT prompt
    assert batch.label_counts(2).tolist() == [9, 10, 11]
    vocab = 50
    peaked = torch.nn.functional.one_hot(batch.targets(1).clamp(min=0), vocab).float() * 50
    assert cross_entropy_sum(peaked, batch.targets(1)) < 1e-6  # ignored positions add nothing
    assert cross_entropy_sum(peaked, batch.targets(2).clamp(min=0)) > 1


def test_model_feeds_mtp_the_next_token_embeddings():
    model = dsv3.build_model(dsv3.preset("tiny").replace(vocab_size=64, num_hidden_layers=2))
    tokens = torch.randint(0, 64, (2, 10))
    full = model(tokens[:, :8], future_tokens=tokens[:, 8:9], with_mtp=True).mtp_logits[0]
    # without future tokens module 1 predicts at the first S - 1 positions only, from the same inputs
    short = model(tokens[:, :8], with_mtp=True).mtp_logits[0]
    torch.testing.assert_close(full[:, :7], short)
    assert full.shape[1] == 8 and short.shape[1] == 7


# ---------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def small_config(corpus, out, **changes) -> TrainConfig:
    base = dict(data=str(corpus), vocab_size=300, cache_dir=str(out.parent / "cache"), out=str(out), steps=6,
                seq_len=32, batch_size=4, micro_batch_size=2, eval_every=3, eval_batches=2, save_every=2,
                sample_tokens=4, model={"num_hidden_layers": 2, "hidden_size": 64})
    base.update(changes)
    return TrainConfig(**base)


# Large enough that the CPU kernels split their work over threads (ATen's grain is 32,768 elements: a micro-batch
# of 4 x 64 tokens with 4 experts each is 1,024 expert copies x 64 = 65,536 elements), run on two threads.
PARALLEL = dict(seq_len=64, batch_size=8, micro_batch_size=4)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def losses(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_same_run_twice_is_bitwise_equal(corpus, tmp_path, two_threads):
    """Two runs of one config on two CPU threads log the same numbers (the MoE dispatch's backward used to add
    a token's expert gradients in whatever order the threads ran: runs drifted apart from step 4)."""
    a = train(small_config(corpus, tmp_path / "a", **PARALLEL), log=lambda *a: None)
    b = train(small_config(corpus, tmp_path / "b", **PARALLEL), log=lambda *a: None)
    assert a.val_loss == b.val_loss
    for ra, rb in zip(losses(tmp_path / "a"), losses(tmp_path / "b")):
        for key in ("loss", "mtp_loss", "balance_loss", "grad_norm", "expert_load", "val_loss"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)
    wa = dsv3.load_pretrained(tmp_path / "a" / "export", dtype=torch.float32).state_dict()
    wb = dsv3.load_pretrained(tmp_path / "b" / "export", dtype=torch.float32).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_kill_and_resume_equals_uninterrupted_run(corpus, tmp_path, two_threads):
    full = train(small_config(corpus, tmp_path / "full", **PARALLEL), log=lambda *a: None)
    assert not full.interrupted and full.val_loss is not None and math.isfinite(full.val_ppl)
    part = train(small_config(corpus, tmp_path / "part", stop_after=3, **PARALLEL), log=lambda *a: None)
    assert part.interrupted and part.step == 3
    resumed = train(small_config(corpus, tmp_path / "part", **PARALLEL), resume=True, log=lambda *a: None)
    assert resumed.step == full.step
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert [r["step"] for r in b] == list(range(1, full.step + 1))
    for ra, rb in zip(a, b):  # bitwise on CPU: every logged loss, norm and expert load
        for key in ("loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "expert_load", "val_loss"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)
    fa = dsv3.load_pretrained(tmp_path / "full" / "export", dtype=torch.float32).state_dict()
    fb = dsv3.load_pretrained(tmp_path / "part" / "export", dtype=torch.float32).state_dict()
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    # the routing biases moved (aux-loss-free balancing ran) and were restored
    assert any(v.abs().sum() > 0 for k, v in fa.items() if k.endswith("e_score_correction_bias"))


def test_crash_mid_checkpoint_write_then_resume_equals_uninterrupted_run(corpus, tmp_path, monkeypatch):
    """A process that dies while writing checkpoint 4 (save_every 2) leaves checkpoint 2 usable; resuming from
    it drops the metrics of steps 3-4 and recomputes them bitwise."""
    import dsv3.train.state as state
    from dsv3.train.state import latest_checkpoint, read_checkpoint

    full = train(small_config(corpus, tmp_path / "full"), log=lambda *a: None)
    real_save = state.save_file

    def dying_save(tensors, path):
        if "step_0000004" in path and path.endswith("optimizer.safetensors"):
            raise OSError("simulated crash while writing the checkpoint")
        real_save(tensors, path)

    monkeypatch.setattr(state, "save_file", dying_save)
    out = tmp_path / "crash"
    with pytest.raises(OSError, match="simulated crash"):
        train(small_config(corpus, out), log=lambda *a: None)
    monkeypatch.setattr(state, "save_file", real_save)
    assert len(losses(out)) == 4  # steps 3 and 4 were logged after the last complete checkpoint
    assert latest_checkpoint(out).name == "step_0000002"
    read_checkpoint(latest_checkpoint(out))  # complete and checksums intact
    [half_written] = (out / "checkpoints").glob(".tmp-step_0000004-*")
    half_written.rename(half_written.with_name(".tmp-step_0000004-999999"))  # as if left by another process
    # continuing with another sequence length cannot reproduce the data stream: a clear error, not a crash
    with pytest.raises(CheckpointError, match="data stream"):
        train(small_config(corpus, out, seq_len=16), resume=True, log=lambda *a: None)
    resumed = train(small_config(corpus, out), resume=True, log=lambda *a: None)
    assert resumed.step == full.step and not list((out / "checkpoints").glob(".tmp-*"))
    a, b = losses(tmp_path / "full"), losses(out)
    assert [r["step"] for r in b] == list(range(1, full.step + 1))
    for ra, rb in zip(a, b):
        for key in ("loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "expert_load", "val_loss"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)
    fa = dsv3.load_pretrained(tmp_path / "full" / "export", dtype=torch.float32).state_dict()
    fb = dsv3.load_pretrained(out / "export", dtype=torch.float32).state_dict()
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_run_follows_schedules_and_balances_over_the_global_batch(corpus, tmp_path):
    """Each step's lr / batch / gamma / MTP weight are the schedules at the tokens seen before it; expert loads
    count every micro-batch of the step; the routing biases are exactly the sum of the +-gamma moves."""
    cfg = small_config(corpus, tmp_path / "run", steps=40, seq_len=16, batch_size=2, micro_batch_size=1,
                       eval_every=0, save_every=0, sample_tokens=0)
    r = train(cfg, log=lambda *a: None)
    total = cfg.steps * cfg.batch_size * cfg.seq_len
    sched = Schedules.paper(total, peak_lr=cfg.lr, warmup_tokens=cfg.warmup * total, batch_size=cfg.batch_size)
    model = dsv3.load_pretrained(r.run_dir / "export", dtype=torch.float32)
    gates, top_k = moe_gates(model), model.config.num_experts_per_tok
    recs = losses(r.run_dir)
    bias = [torch.zeros(g.n_experts) for g in gates]
    for rec in recs:
        before = rec["tokens"] - rec["batch_size"] * cfg.seq_len
        assert rec["batch_size"] == sched.batch_size(before, cfg.micro_batch_size)
        assert rec["lr"] == sched.lr(before) and rec["gamma"] == sched.bias_update_speed(before)
        assert rec["mtp_weight"] == sched.mtp_weight(before)
        assert len(rec["expert_load"]) == len(gates)
        for layer, load in enumerate(rec["expert_load"]):
            assert sum(load) == rec["batch_size"] * cfg.seq_len * top_k  # all micro-batches, not the last one
            load = torch.tensor(load, dtype=torch.float32)
            bias[layer] += rec["gamma"] * torch.sign(load.mean() - load)
            assert rec["maxvio"][layer] == round(max_violation(load), 4)
    assert recs[0]["batch_size"] == 1 and recs[-1]["batch_size"] == 2  # the batch ramp ran
    assert recs[0]["gamma"] == cfg.gamma and recs[-1]["gamma"] == 0  # gamma is 0 for the last stretch
    assert recs[0]["mtp_weight"] == 0.3 and recs[-1]["mtp_weight"] == 0.1
    assert recs[-1]["lr"] == pytest.approx(cfg.lr * 0.1)  # the first final constant stage
    for gate, expected in zip(gates, bias):
        torch.testing.assert_close(gate.e_score_correction_bias, expected, atol=1e-6, rtol=0)
    assert any(b.abs().sum() > 0 for b in bias)


def test_validation_split_too_small_is_a_clear_error(tmp_path):
    from dsv3.data import DataError
    from dsv3.data.corpus import validation_keys

    root = tmp_path / "corpus"
    root.mkdir()
    names = [f"doc{i:02d}.txt" for i in range(30)]
    held_out = validation_keys(names)
    for name in names:
        (root / name).write_text("x\n" if name in held_out else "alpha beta gamma delta " * 100)
    with pytest.raises(DataError, match="validation split .* too few"):
        train(small_config(root, tmp_path / "run"), log=lambda *a: None)


def test_checkpoint_keep_last_and_errors(corpus, tmp_path):
    out = tmp_path / "run"
    r = train(small_config(corpus, out, keep_last=2, save_every=1), log=lambda *a: None)
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == [f"step_{r.step - 1:07d}", f"step_{r.step:07d}"]
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(small_config(corpus, out), log=lambda *a: None)
    # an incompatible model
    with pytest.raises(CheckpointError, match="model config differs"):
        train(small_config(corpus, out, steps=8, model={"num_hidden_layers": 3, "hidden_size": 64}), resume=True,
              log=lambda *a: None)
    # a corrupted file
    file = out / "checkpoints" / f"step_{r.step:07d}" / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        train(small_config(corpus, out, steps=8), resume=True, log=lambda *a: None)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(small_config(corpus, tmp_path / "empty"), resume=True, log=lambda *a: None)


@pytest.mark.parametrize("changes, field", [
    ({"batch_size": 10, "micro_batch_size": 4}, "batch_size"),
    ({"lr": -1.0}, "lr"),
    ({"balance": "none"}, "balance"),
    ({"steps": 0}, "steps"),
    ({"model": {"n_group": 3}}, "model.n_group"),
    ({"model": {"nonsense": 1}}, "model.nonsense"),
    ({"device": "tpu"}, "device"),
    ({"device": 3}, "device"),
    ({"warmup": "soon"}, "warmup"),
    ({"warmup": 0.9}, "warmup"),  # would end after the constant stage
    ({"gamma": -0.001}, "gamma"),
    ({"mtp": "no"}, "mtp"),
    ({"eval_every": True}, "eval_every"),
    ({"steps": 2.5}, "steps"),
    ({"vocab_size": 100}, "vocab_size"),  # below 256 bytes + special tokens for the trained BPE
    ({"sample_tokens": -1}, "sample_tokens"),
    ({"lr": float("nan")}, "lr"),
])
def test_bad_train_config(changes, field):
    with pytest.raises(ConfigError, match=rf"^{field}"):
        TrainConfig(**changes)


def test_config_files(tmp_path):
    (tmp_path / "a.yaml").write_text("steps: 7\nlr: 0.001\nmodel:\n  num_hidden_layers: 3\n")
    (tmp_path / "b.toml").write_text("steps = 9\n[model]\nhidden_size = 64\n")
    (tmp_path / "c.yaml").write_text("stepz: 7\n")
    a = TrainConfig.from_file(tmp_path / "a.yaml")
    assert a.steps == 7 and a.model == {"num_hidden_layers": 3}
    assert TrainConfig.from_file(tmp_path / "b.toml", steps=3).steps == 3
    with pytest.raises(ConfigError, match="stepz"):
        TrainConfig.from_file(tmp_path / "c.yaml")
    # YAML 1.1 reads 3e-3 as a string: numbers in text are taken as numbers, other text is refused
    (tmp_path / "d.yaml").write_text("lr: 3e-3\ngamma: '1e-3'\nmodel:\n  num_hidden_layers: 3\n")
    d = TrainConfig.from_file(tmp_path / "d.yaml", model={"hidden_size": 64})
    assert d.lr == 0.003 and d.gamma == 0.001
    assert d.model == {"num_hidden_layers": 3, "hidden_size": 64}  # --set model.X adds to the file's model


def test_cli_reports_bad_settings_and_data_without_traceback(tmp_path, capsys):
    from dsv3.cli import main

    (tmp_path / "bad.jsonl").write_text('{"txt": "no text field"}\n')
    cases = [
        (["--set", "warmup=soon"], "warmup: must be a number"),
        (["--set", "gamma=1e-3", "--set", "beta2=1.5"], "beta2: must be in [0, 1)"),  # 1e-3 parses as a number
        (["--data", str(tmp_path / "bad.jsonl")], '"text" field'),
        (["--tokenizer", str(tmp_path / "bad.jsonl")], "not a valid Hugging Face tokenizer.json"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA is not available"))
    for args, message in cases:
        code = main(["train", *args, "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")])
        err = capsys.readouterr().err
        assert code == 2 and "dsv3 train: error: " in err and message in err, (args, err[-500:])
        assert "Traceback" not in err


def test_aux_loss_ablation_and_no_mtp(corpus, tmp_path):
    r = train(small_config(corpus, tmp_path / "abl", balance="aux_loss", mtp=False, steps=2, eval_every=0),
              log=lambda *a: None)
    rec = losses(r.run_dir)
    assert all(x["mtp_loss"] == 0 and x["gamma"] == 0 and x["balance_loss"] > 0 for x in rec)
    model = dsv3.load_pretrained(r.run_dir / "export")
    assert len(model.mtp) == 0
    # the export carries the run's tokenizer in the Hugging Face layout
    from transformers import AutoTokenizer

    from dsv3.data import Tokenizer

    hf = AutoTokenizer.from_pretrained(r.run_dir / "export")
    text = "alpha beta gamma"
    assert hf(text, add_special_tokens=False).input_ids == Tokenizer.load(r.run_dir / "tokenizer").encode(text)
    assert hf.eos_token_id == Tokenizer.load(r.run_dir / "tokenizer").eos_id


def test_default_cli_path_end_to_end(tmp_path):
    """`dsv3 train` with its defaults (tiny preset, stdlib corpus, CPU), cut to a few steps, then sample/plot."""
    proc = run_cli("train", "--steps", "2", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
                   "--eval-every", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "perplexity" in proc.stdout and "sample for" in proc.stdout
    # the default prompt ends where a token ends: its tokens begin every longer text that starts with it (the old
    # "def fibonacci(n):\n" did not: the BPE merges the newline with the indentation that follows)
    from dsv3.data import Tokenizer

    tok, prompt = Tokenizer.load(tmp_path / "run" / "tokenizer"), TrainConfig().sample_prompt
    for rest in ("\n    return n", "\n    if n < 2:", " # comment"):
        assert tok.encode(prompt + rest)[: len(tok.encode(prompt))] == tok.encode(prompt), rest
    sample = proc.stdout.split("sample for", 1)[1].split("\n", 1)[1]
    assert sample.startswith(prompt) and sample[len(prompt):].strip()  # not a run of blank lines
    out = run_cli("sample", str(tmp_path / "run"), "--prompt", "def f(", "--max-new-tokens", "5")
    assert out.returncode == 0 and out.stdout.startswith("def f("), out.stderr[-2000:]
    plots = run_cli("plot", str(tmp_path / "run"))
    assert plots.returncode == 0, plots.stderr[-2000:]
    assert all(Path(p).stat().st_size > 1000 for p in plots.stdout.split())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_resume_finishes(corpus, tmp_path, sig):
    out = tmp_path / "run"
    args = ["train", "--data", str(corpus), "--vocab-size", "300", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out), "--steps", "400", "--seq-len", "32", "--batch-size", "2", "--micro-batch-size", "2",
            "--save-every", "0", "--eval-every", "0", "--set", "model.num_hidden_layers=2", "--set",
            "model.hidden_size=64"]
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-m", "dsv3.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "checkpoint saved" in err or "checkpoint saved" in _
    step = len(metrics.read_text().splitlines())
    assert 3 <= step < 400
    assert (out / "checkpoints" / f"step_{step:07d}").is_dir()
    resumed = run_cli(*args[:-4], "--resume", "--steps", "400")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] >= 400


def test_document_mask_isolates_packed_documents():
    model = dsv3.build_model(dsv3.preset("tiny").replace(vocab_size=128, num_hidden_layers=2), seed=1)
    a, b = torch.randint(0, 128, (1, 7)), torch.randint(0, 128, (1, 9))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        masked = model(packed, doc_ids=doc_ids).logits
        alone = model(b).logits
        unmasked = model(packed).logits
    # RoPE is relative, so document b alone at positions 0.. equals b packed after a, once a is masked out
    torch.testing.assert_close(masked[:, 7:], alone, atol=1e-5, rtol=1e-5)
    assert (unmasked[:, 7:] - alone).abs().max() > 1e-3  # without the mask a leaks into b


def test_bf16_moments_optimizer_tracks_fp32_adamw():
    from dsv3.train.optim import build_optimizer

    torch.manual_seed(0)
    w1 = torch.nn.Linear(32, 16)
    w2 = torch.nn.Linear(32, 16)
    w2.load_state_dict(w1.state_dict())
    o1 = build_optimizer(w1, 1e-2, (0.9, 0.95), 0.1, bf16_moments=False)
    o2 = build_optimizer(w2, 1e-2, (0.9, 0.95), 0.1, bf16_moments=True)
    for _ in range(20):
        x = torch.randn(8, 32)
        for m, o in ((w1, o1), (w2, o2)):
            m(x).pow(2).mean().backward()
            o.step()
            o.zero_grad()
    state = o2.state[w2.weight]
    assert state["exp_avg"].dtype == torch.bfloat16 and w2.weight.dtype == torch.float32
    torch.testing.assert_close(w2.weight, w1.weight, atol=2e-3, rtol=0)
    assert not torch.equal(w2.weight, w1.weight)  # really a different (lower-precision) state

"""The training loop, top to bottom: data -> model -> AdamW steps with the report's schedules, balancing,
MTP loss, metrics, validation, checkpoints and export."""

from __future__ import annotations

import hashlib
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import build_model
from ..checkpoint import CheckpointError, save_pretrained
from ..config import ConfigError, ModelConfig
from ..data import DataError, PackedLoader, Tokenizer, iter_eval_batches, load_or_build, train_tokenizer
from ..data.corpus import corpus_fingerprint
from ..info import model_stats
from ..model import DeepSeekV3
from .balance import batch_aux_loss, max_violation, moe_gates, sequence_wise_loss, update_bias
from .config import TrainConfig
from .optim import build_optimizer
from .sample import generate
from .schedules import Schedules
from .state import latest_checkpoint, read_checkpoint, restore, save_checkpoint

# Dense bf16 peak of the GPUs we measure on (datasheet), for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name} requested but CUDA is not available (use --device cpu)")
    return device


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def prepare_tokenizer(cfg: TrainConfig, log=print) -> Tokenizer:
    """The run's tokenizer: the one given, or a BPE trained once on the corpus and cached."""
    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)
    key = hashlib.sha256(f"{corpus_fingerprint(cfg.data, 'train')}|{cfg.vocab_size}".encode()).hexdigest()[:16]
    tok_dir = Path(cfg.cache_dir) / "tokenizers" / key
    if (tok_dir / "tokenizer.json").is_file():
        return Tokenizer.load(tok_dir)
    log(f"training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) on {cfg.data or 'the Python stdlib'}")
    return train_tokenizer(cfg.data, tok_dir, vocab_size=cfg.vocab_size)


def token_cache_dir(cfg: TrainConfig, tokenizer: Tokenizer) -> Path:
    source = "<stdlib>" if cfg.data is None else str(Path(cfg.data).expanduser().resolve())
    key = hashlib.sha256(f"{source}|{tokenizer.fingerprint}".encode()).hexdigest()[:16]
    return Path(cfg.cache_dir) / "tokens" / key


@dataclass
class RunResult:
    run_dir: Path
    step: int
    tokens: int
    val_loss: float | None
    val_ppl: float | None
    sample: str | None
    interrupted: bool


class _StopFlag:
    """SIGTERM/SIGINT ask the loop to stop after the current step, with a checkpoint."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def compute_losses(out, window: torch.Tensor, cfg: TrainConfig, top_k: int):
    """(main loss, MTP loss, balance loss) of one micro-batch.

    ``window`` (B, S + 1 + D) holds the inputs t_0..t_{S-1}, then the targets: the main head at position i
    predicts t_{i+1}, MTP depth k predicts t_{i+k+1} (report eq. 24: L_MTP^k = CE over those targets), and
    L_MTP = 1/D * sum_k L_MTP^k (eq. 25; the trainer multiplies it by lambda).
    """
    s = cfg.seq_len
    loss = cross_entropy(out.logits, window[:, 1 : s + 1])
    mtp_loss = torch.zeros((), device=window.device)
    if out.mtp_logits:
        mtp_loss = sum(cross_entropy(lg, window[:, k + 1 : k + 1 + s])
                       for k, lg in enumerate(out.mtp_logits, start=1)) / len(out.mtp_logits)
    bal = torch.zeros((), device=window.device)
    if out.router_stats:
        if cfg.balance == "aux_free":
            bal = cfg.seq_aux_alpha * sequence_wise_loss(out.router_stats, top_k, s)
        else:
            bal = cfg.aux_loss_alpha * batch_aux_loss(out.router_stats, top_k, s)
    return loss, mtp_loss, bal


@torch.no_grad()
def evaluate(model: DeepSeekV3, val, cfg: TrainConfig, device: torch.device, autocast) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in iter_eval_batches(val, cfg.seq_len, cfg.micro_batch_size, max_batches=cfg.eval_batches,
                                   return_doc_ids=cfg.doc_mask):
        tokens = batch.tokens.to(device)
        doc_ids = batch.doc_ids[:, : cfg.seq_len].to(device) if batch.doc_ids is not None else None
        with autocast():
            logits = model(tokens[:, : cfg.seq_len], doc_ids=doc_ids).logits
        total += cross_entropy(logits, tokens[:, 1 : cfg.seq_len + 1]).item() * tokens.shape[0]
        count += tokens.shape[0]
    model.train()
    return total / max(count, 1)


def train(cfg: TrainConfig, resume: bool = False, log=print) -> RunResult:
    device = resolve_device(cfg.device)
    run_dir = Path(cfg.out or f"runs/{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise CheckpointError(f"--resume: no checkpoint in {run_dir}/checkpoints")
    if not resume and latest_checkpoint(run_dir) is not None:
        raise CheckpointError(f"{run_dir} already holds checkpoints: pass --resume to continue it, "
                              f"or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    # ---- data
    tokenizer = prepare_tokenizer(cfg, log)
    cache = token_cache_dir(cfg, tokenizer)
    train_data = load_or_build(tokenizer, cfg.data, "train", cache)
    val_data = load_or_build(tokenizer, cfg.data, "val", cache)
    if val_data.n_tokens < cfg.seq_len + 1:  # else validation would average over no window at all
        raise DataError(f"the validation split of {cfg.data or 'the stdlib corpus'} has {val_data.n_tokens} tokens, "
                        f"too few for one window of {cfg.seq_len + 1}: use a shorter --seq-len or more data")
    tokenizer.save(run_dir / "tokenizer")

    # ---- model and optimiser
    mcfg: ModelConfig = cfg.model_config(vocab_size=tokenizer.vocab_size)
    if not cfg.mtp:
        mcfg = mcfg.replace(num_nextn_predict_layers=0)
    if cfg.balance == "aux_loss":  # the ablation routes without the bias
        mcfg = mcfg.replace(topk_method="greedy" if mcfg.n_group == 1 else "group_limited_greedy")
    model = build_model(mcfg, device=device, dtype=torch.float32, seed=cfg.seed)
    if cfg.fp8:
        from ..fp8 import apply_fp8_training, fp8_backends

        apply_fp8_training(model)
        log("FP8 GEMMs: " + ", ".join(f"{kind} on {name}" for kind, name in fp8_backends(model).items()))
    model.train()
    forward = torch.compile(model) if cfg.compile else model
    optimizer = build_optimizer(model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay, cfg.bf16_moments)
    gates = moe_gates(model)
    depth = mcfg.num_nextn_predict_layers
    loader = PackedLoader(train_data, cfg.seq_len, cfg.micro_batch_size, n_future=1 + depth, seed=cfg.seed,
                          fim_rate=cfg.fim_rate if train_data.fim_tokens is not None else 0.0,
                          return_doc_ids=cfg.doc_mask)
    total_tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    sched = Schedules.paper(total_tokens, peak_lr=cfg.lr, warmup_tokens=cfg.warmup * total_tokens,
                            batch_size=cfg.batch_size,
                            batch_start=None if cfg.batch_ramp else cfg.batch_size, gamma=cfg.gamma)
    step, tokens_seen = 0, 0
    metrics_file = run_dir / "metrics.jsonl"
    if ckpt is not None:
        model_t, opt_t, meta = read_checkpoint(ckpt)
        if meta["model_config"] != mcfg.to_hf_dict():
            diff = sorted(k for k in set(meta["model_config"]) | set(mcfg.to_hf_dict())
                          if meta["model_config"].get(k) != mcfg.to_hf_dict().get(k))
            raise CheckpointError(f"{ckpt}: model config differs from this run's in {diff}")
        restore(model, optimizer, model_t, opt_t, meta)
        try:
            loader.load_state_dict(meta["loader"])
        except ValueError as e:  # e.g. --seq-len or --micro-batch-size changed, or other data
            raise CheckpointError(f"{ckpt}: cannot continue this run's data stream: {e}") from None
        step, tokens_seen = meta["step"], meta["tokens"]
        _truncate_metrics(metrics_file, step)
        log(f"resumed {run_dir} at step {step} ({tokens_seen:,} tokens)")
    (run_dir / "train_config.json").write_text(cfg.to_json())
    mcfg.to_json(run_dir / "config.json")

    flops_per_token = 3 * model_stats(mcfg, seq_len=cfg.seq_len).forward_flops_per_token
    peak = peak_flops(device)
    use_bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    n_params = model.num_parameters(include_mtp=False)
    log(f"model {cfg.preset}: {n_params:,} parameters (+{model.num_parameters() - n_params:,} MTP), "
        f"{len(gates)} MoE layers, device {device}; {total_tokens:,} tokens planned")

    from tqdm import tqdm

    bar = tqdm(total=total_tokens, initial=tokens_seen, unit="tok", unit_scale=True, dynamic_ncols=True,
               disable=None, file=sys.stderr)
    val_loss = None
    steps_this_run = 0
    interrupted = False
    with _StopFlag() as stop, open(metrics_file, "a") as metrics:
        while tokens_seen < total_tokens:
            t0 = time.perf_counter()
            batch_size = sched.batch_size(tokens_seen, cfg.micro_batch_size)
            n_micro = batch_size // cfg.micro_batch_size
            lr = sched.lr(tokens_seen)
            for group in optimizer.param_groups:
                group["lr"] = lr
            mtp_weight = sched.mtp_weight(tokens_seen) if depth else 0.0
            loads = [torch.zeros(g.n_experts, device=device) for g in gates]
            # Summed on the device and read once per step: an .item() per micro-batch would make the host wait
            # for each forward and backward before queueing the next, so the GPU idles while it launches.
            sums = {k: torch.zeros((), dtype=torch.float64, device=device)
                    for k in ("loss", "mtp_loss", "balance_loss")}
            for _ in range(n_micro):
                batch = next(loader)
                window = batch.tokens.to(device, non_blocking=True)
                inputs = window[:, : cfg.seq_len]
                doc_ids = batch.doc_ids
                if doc_ids is not None:  # non_blocking: a blocking copy would wait for the queued GPU work
                    doc_ids = doc_ids[:, : cfg.seq_len].to(device, non_blocking=True)
                with autocast():
                    out = forward(inputs, future_tokens=window[:, cfg.seq_len : cfg.seq_len + depth],
                                  doc_ids=doc_ids, with_mtp=depth > 0, with_stats=True)
                    loss, mtp_loss, bal = compute_losses(out, window, cfg, mcfg.num_experts_per_tok)
                    total = loss + mtp_weight * mtp_loss + bal
                sums["mtp_loss"] += mtp_loss.detach().double() / n_micro
                sums["balance_loss"] += bal.detach().double() / n_micro
                (total / n_micro).backward()
                sums["loss"] += loss.detach().double() / n_micro
                for acc, st in zip(loads, out.router_stats):
                    acc += st.counts
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # read after the step
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            gamma = sched.bias_update_speed(tokens_seen) if cfg.balance == "aux_free" else 0.0
            update_bias(gates, loads, gamma)
            grad_norm = grad_norm.item()
            sums = {k: v.item() for k, v in sums.items()}
            step += 1
            steps_this_run += 1
            step_tokens = batch_size * cfg.seq_len
            tokens_seen += step_tokens
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            record: dict[str, Any] = {
                "step": step, "tokens": tokens_seen, **{k: round(v, 6) for k, v in sums.items()},
                "grad_norm": round(grad_norm, 5), "lr": lr, "batch_size": batch_size, "gamma": gamma,
                "mtp_weight": mtp_weight, "tokens_per_s": round(step_tokens / dt, 1),
                "maxvio": [round(max_violation(x), 4) for x in loads],
                "expert_load": [x.long().tolist() for x in loads],
            }
            if peak:
                record["mfu"] = round(flops_per_token * step_tokens / dt / peak, 4)
            record["maxvio_mean"] = round(sum(record["maxvio"]) / max(len(loads), 1), 4)
            if not math.isfinite(sums["loss"]):
                raise FloatingPointError(f"loss is {sums['loss']} at step {step}; lower --lr or check the data")
            last = tokens_seen >= total_tokens
            if (cfg.eval_every and step % cfg.eval_every == 0) or last:
                val_loss = evaluate(model, val_data, cfg, device, autocast)
                record["val_loss"] = round(val_loss, 5)
                record["val_ppl"] = round(math.exp(min(val_loss, 50)), 3)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            bar.update(step_tokens)
            bar.set_postfix_str(f"step {step} loss {sums['loss']:.3f} lr {lr:.2e} maxvio {record['maxvio_mean']:.2f}"
                                + (f" val {val_loss:.3f}" if "val_loss" in record else ""))
            stopping = stop.signal is not None or (cfg.stop_after and steps_this_run >= cfg.stop_after)
            if (cfg.save_every and step % cfg.save_every == 0) or last or stopping:
                save_checkpoint(run_dir, step, model, optimizer, {
                    "tokens": tokens_seen, "loader": loader.state_dict(), "model_config": mcfg.to_hf_dict(),
                    "train_config": cfg.to_dict(),
                }, keep_last=cfg.keep_last)
            if stopping and not last:
                interrupted = True
                why = f"signal {stop.signal}" if stop.signal else f"--stop-after {cfg.stop_after}"
                log(f"\nstopped at step {step} ({why}); checkpoint saved, continue with --resume --out {run_dir}")
                break
    bar.close()
    result = RunResult(run_dir, step, tokens_seen, val_loss, math.exp(val_loss) if val_loss is not None else None,
                       None, interrupted)
    if not interrupted:
        save_pretrained(model, run_dir / "export")
        tokenizer.save(run_dir / "export")
        result.sample = generate(model, tokenizer, cfg.sample_prompt, cfg.sample_tokens,
                                 temperature=cfg.sample_temperature, top_k=cfg.sample_top_k or None, seed=cfg.seed)
    return result


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from (they will be recomputed)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))

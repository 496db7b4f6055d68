"""The training run: :class:`Trainer` builds the parts, :meth:`Trainer.fit` is the loop, top to bottom.

One optimiser step (:meth:`Trainer.step`): the schedules give the learning rate, the global batch, lambda and
gamma; this rank takes its micro-batches; :func:`~dsv3.train.step.forward_backward` runs them; the routed
experts' gradients are reduced over their replicas; the gates' loads are summed over the data-parallel ranks;
gradients are clipped; AdamW steps; the routing biases move on the global loads; metrics are logged by rank 0.

The same code runs in one process and under ``torchrun`` (:mod:`dsv3.train.parallel`).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import build_model
from ..checkpoint import CheckpointError, save_pretrained
from ..config import ConfigError, ModelConfig
from ..data import DataError, PackedLoader, Tokenizer, iter_eval_batches, load_or_build, train_tokenizer
from ..data.corpus import corpus_fingerprint
from ..info import model_stats
from .balance import Balancer, max_violation
from .batch import TrainBatch
from .checkpointer import Checkpointer, load_checkpoint_model
from .config import TrainConfig
from .optim import build_optimizer
from .parallel import (
    Distributed,
    clip_grad_norm,
    expert_parameters,
    grad_sync_context,
    init_distributed,
    parallelize,
)
from .sample import generate
from .schedules import Schedules
from .signals import StopFlag
from .state import read_meta
from .step import cross_entropy_sum, forward_backward

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


def _quiet(*args, **kwargs) -> None:
    pass


class Trainer:
    """A training run's parts, built from a :class:`TrainConfig` (and, under torchrun, the process group)."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, log=print):
        self.cfg = cfg
        self.model_name = getattr(self, "model_name", cfg.preset)
        self.run_prefix = getattr(self, "run_prefix", cfg.preset)
        self.env: Distributed = init_distributed(resolve_device(cfg.device), ep=cfg.ep, dp_shard=cfg.dp_shard,
                                                 pp=cfg.pp)
        env = self.env
        self.device = env.device
        self.log = log if env.is_main else _quiet
        self.run_dir = self._run_dir()
        self.checkpointer = Checkpointer(self.run_dir, env, keep_last=cfg.keep_last)
        ckpt = self.checkpointer.latest() if resume else None
        if resume and ckpt is None:
            raise CheckpointError(f"--resume: no checkpoint in {self.run_dir}/checkpoints")
        if not resume and self.checkpointer.latest() is not None:
            raise CheckpointError(f"{self.run_dir} already holds checkpoints: pass --resume to continue it, "
                                  f"or choose another --out")
        micro_global = cfg.micro_batch_size * env.dims.dp
        if cfg.batch_size % micro_global:
            raise ConfigError(f"batch_size: {cfg.batch_size} sequences must be a multiple of micro_batch_size x "
                              f"data-parallel ranks = {cfg.micro_batch_size} x {env.dims.dp} = {micro_global}")
        torch.manual_seed(cfg.seed)

        self.build_data()

        # ---- model, parallelism, optimiser
        self.model_config, self.model = self.build_model()
        mcfg = self.model_config
        self.depth = mcfg.num_nextn_predict_layers if cfg.mtp else 0  # a checkpoint's MTP may stay untrained
        self.pipeline = None
        if env.dims.pp > 1:  # keeps only this rank's stages of the model
            from .pipeline_parallel import Pipeline

            self.pipeline = Pipeline(self.model, env, cfg.pp_schedule, self.depth, cfg.pp_overlap)
            self.pipeline.check_microbatches(self._microbatch_counts())
        self.balancer = Balancer(
            self.model, "sequence" if cfg.balance == "aux_free" else "batch",
            cfg.seq_aux_alpha if cfg.balance == "aux_free" else cfg.aux_loss_alpha,
            group=dist.group.WORLD if env.dims.distributed else None, replica_group=env.dp_group)
        self.model.train()
        on_meta = next(self.model.parameters()).device.type == "meta"
        self.forward = parallelize(self.model, env, fp8=cfg.fp8, compile=cfg.compile, fp8_dispatch=cfg.fp8_dispatch,
                                   materialize=self._materialize if on_meta else None)
        self.reach = self._expert_placement() if env.dims.ep > 1 else None
        self.holders = None
        if self.pipeline is not None:
            if self.pipeline.zero_bubble:
                from ..pipeline.weight_grad import defer_weight_gradients

                defer_weight_gradients(self.model, self.pipeline.store)
            self.holders = self.pipeline.holders()
        if cfg.fp8:
            from ..fp8 import fp8_backends

            self.log("FP8 GEMMs: " + ", ".join(f"{k} on {v}" for k, v in fp8_backends(self.model).items()))
        if cfg.doc_mask:
            from ..model.doc_mask import describe

            self.log(describe(self.device))
        self.grad_sync = grad_sync_context(self.forward, env)
        zero1 = env.dims.distributed and env.dims.shard == "zero1"
        self.optimizer = build_optimizer(self.model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay,
                                         cfg.bf16_moments, zero1_group=env.dp_group if zero1 else None,
                                         experts=expert_parameters(self.model) if env.dims.ep > 1 else [],
                                         expert_group=env.dp_outer_group)

        # ---- data stream, schedules, progress
        self.loader = self.build_loader()
        self.total_tokens, self.sched = self.build_schedules()
        self.step_count, self.tokens_seen = 0, 0
        self.metrics_file = self.run_dir / "metrics.jsonl"
        if ckpt is not None:
            self._resume(ckpt)
        if env.is_main:
            (self.run_dir / "train_config.json").write_text(cfg.to_json())
            mcfg.to_json(self.run_dir / "config.json")
            self.tokenizer.save(self.run_dir / "tokenizer")
        self.stats = model_stats(mcfg, seq_len=cfg.seq_len)  # of the whole model, not this rank's shard
        self.flops_per_token = 3 * self.stats.forward_flops_per_token
        self.peak = peak_flops(self.device)

    # ------------------------------------------------------------------------------------------ recipe hooks
    # What a recipe (pre-training here, SFT and GRPO in dsv3.posttrain) chooses; the rest is shared.
    def build_data(self) -> None:
        """Set ``self.tokenizer`` and the recipe's data (rank 0 trains the tokenizer and tokenises the corpus
        once; the other ranks read its cache)."""
        cfg, env = self.cfg, self.env
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            prepare_tokenizer(cfg, self.log)
        env.barrier()
        self.tokenizer = prepare_tokenizer(cfg, self.log)
        cache = token_cache_dir(cfg, self.tokenizer)
        if env.is_main:
            load_or_build(self.tokenizer, cfg.data, "train", cache)
            load_or_build(self.tokenizer, cfg.data, "val", cache)
        env.barrier()
        self.train_data = load_or_build(self.tokenizer, cfg.data, "train", cache)
        self.val_data = load_or_build(self.tokenizer, cfg.data, "val", cache)
        if self.val_data.n_tokens < cfg.seq_len + 1:  # else validation would average over no window at all
            raise DataError(f"the validation split of {cfg.data or 'the stdlib corpus'} has {self.val_data.n_tokens} "
                            f"tokens, too few for one window of {cfg.seq_len + 1}: use a shorter --seq-len or more data")

    def build_model(self) -> tuple[ModelConfig, torch.nn.Module]:
        """The model's configuration and the model, in float32 on this rank's device (before parallelism)."""
        cfg = self.cfg
        mcfg: ModelConfig = cfg.model_config(vocab_size=self.tokenizer.vocab_size)
        if not cfg.mtp:
            mcfg = mcfg.replace(num_nextn_predict_layers=0)
        if cfg.balance == "aux_loss":  # the ablation routes without the bias
            mcfg = mcfg.replace(topk_method="greedy" if mcfg.n_group == 1 else "group_limited_greedy")
        transform, device = None, self.device
        if self.env.dims.pp > 1:  # a pipeline rank builds only its stages
            from .pipeline_parallel import stage_pruner

            transform = stage_pruner(mcfg, self.env, cfg.pp_schedule)
        elif self.env.dims.distributed:  # allocated once sharded: parallelize() materialises it
            device = torch.device("meta")
        return mcfg, build_model(mcfg, device=device, dtype=torch.float32, seed=cfg.seed, transform=transform)

    def build_loader(self):
        """The endless iterator of this rank's micro-batches (with ``state_dict`` / ``load_state_dict``)."""
        cfg, env = self.cfg, self.env
        return PackedLoader(self.train_data, cfg.seq_len, cfg.micro_batch_size, n_future=1 + self.depth,
                            seed=cfg.seed, fim_rate=cfg.fim_rate if self.train_data.fim_tokens is not None else 0.0,
                            return_doc_ids=cfg.doc_mask, rank=env.dp_rank, world_size=env.dims.dp)

    def build_schedules(self) -> tuple[int, Schedules]:
        """The run's total tokens and its schedules (learning rate, batch size, gamma, MTP weight)."""
        cfg = self.cfg
        total = cfg.steps * cfg.batch_size * cfg.seq_len
        return total, Schedules.paper(total, peak_lr=cfg.lr, warmup_tokens=cfg.warmup * total,
                                      batch_size=cfg.batch_size, batch_start=None if cfg.batch_ramp else cfg.batch_size,
                                      gamma=cfg.gamma)

    # ------------------------------------------------------------------------------------------ set-up
    def _run_dir(self) -> Path:
        name = self.cfg.out or f"runs/{self.run_prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
        if self.env.dims.distributed:  # one name for all ranks (their clocks may cross a second)
            import torch.distributed as dist

            box = [name]
            dist.broadcast_object_list(box, src=0)
            name = box[0]
        return Path(name)

    def _microbatch_counts(self) -> set[int]:
        """The micro-batches per rank a step can have over the run (the batch ramp moves in whole multiples)."""
        cfg = self.cfg
        unit = cfg.micro_batch_size * self.env.dims.dp
        start = cfg.batch_size if not cfg.batch_ramp else Schedules.paper(1.0, batch_size=cfg.batch_size).batch_start
        return set(range(max(1, start // unit), cfg.batch_size // unit + 1))

    def _resume(self, ckpt: Path) -> None:
        saved, ours = read_meta(ckpt)["model_config"], self.model_config.to_hf_dict()
        if saved != ours:
            diff = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
            raise CheckpointError(f"{ckpt}: model config differs from this run's in {diff}")
        meta = self.checkpointer.load(ckpt, self.model, self.optimizer)
        try:
            self.loader.load_state_dict(meta["loader"])
        except ValueError as e:  # e.g. --seq-len or --micro-batch-size changed, or other data
            raise CheckpointError(f"{ckpt}: cannot continue this run's data stream: {e}") from None
        self.step_count, self.tokens_seen = meta["step"], meta["tokens"]
        if self.env.is_main:
            _truncate_metrics(self.metrics_file, self.step_count)
        self.log(f"resumed {self.run_dir} at step {self.step_count} ({self.tokens_seen:,} tokens)")

    def _materialize(self, model: torch.nn.Module) -> None:
        from ..model.init import materialize

        materialize(model, self.device, self.model_config.initializer_range, self.cfg.seed)

    def _expert_placement(self):
        """Where the routing groups land on the expert-parallel ranks (checked with ``node_limited``, logged);
        returns the counter of the ranks and nodes the tokens reach."""
        from .expert_parallel import count_dispatch_reach, describe_expert_sharding, expert_placement

        placement = expert_placement(self.model_config, self.env, self.cfg.ranks_per_node)
        if self.cfg.node_limited:
            try:
                placement.check_node_limited()
            except ValueError as e:
                raise ConfigError(f"node_limited: {e}") from None
        self.log(f"expert parallelism: {placement.describe()}; {describe_expert_sharding(self.model, self.env)}")
        return count_dispatch_reach(self.model, placement, self.device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    # ------------------------------------------------------------------------------------------ one step
    def next_batches(self, n_micro: int) -> list[TrainBatch]:
        """This rank's micro-batches of the next global batch, on the device."""
        out = []
        for _ in range(n_micro):
            b = next(self.loader)  # non_blocking: a blocking copy would wait for the queued GPU work
            out.append(TrainBatch.from_window(b.tokens, self.cfg.seq_len, b.doc_ids).to(self.device, non_blocking=True))
        return out

    def step(self) -> dict[str, Any]:
        """One optimiser step; returns its metrics record (the same on every rank)."""
        cfg, env = self.cfg, self.env
        t0 = time.perf_counter()
        batch_size = self.sched.batch_size(self.tokens_seen, cfg.micro_batch_size * env.dims.dp)
        n_micro = batch_size // (cfg.micro_batch_size * env.dims.dp)
        lr = self.sched.lr(self.tokens_seen)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mtp_weight = self.sched.mtp_weight(self.tokens_seen) if self.depth else 0.0
        batches = self.next_batches(n_micro)
        # labelled positions of the global batch, per depth: the losses' denominators (one small all-reduce)
        counts = env.all_reduce(torch.stack([b.label_counts(self.depth) for b in batches]).sum(0), over="dp")
        denominators = counts.double().clamp(min=1) / env.dims.dp
        self.balancer.start_step(n_micro)
        if self.pipeline is not None:
            sums = self.pipeline.forward_backward(batches, mtp_weight=mtp_weight, denominators=denominators,
                                                  autocast=self.autocast)
            self.pipeline.reduce_grads()
        else:
            sums = forward_backward(self.forward, batches, depth=self.depth, mtp_weight=mtp_weight,
                                    denominators=denominators, autocast=self.autocast, grad_sync=self.grad_sync)
        if env.dims.ep > 1:
            from .expert_parallel import reduce_expert_grads

            reduce_expert_grads(self.model, env)
        loads = self.balancer.take_loads()
        grad_norm = clip_grad_norm(self.model, cfg.grad_clip, env, self.holders)  # read after the step
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        gamma = self.sched.bias_update_speed(self.tokens_seen) if cfg.balance == "aux_free" else 0.0
        self.balancer.update_bias(loads, gamma)
        # every number of the record summed over the ranks at once
        reach = self.reach.take() if self.reach is not None else sums.new_zeros(0)
        totals = env.all_reduce(torch.cat([sums, self.balancer.take_loss().to(sums.device).view(1), reach])).tolist()
        counts = counts.tolist()
        self.step_count += 1
        step_tokens = batch_size * cfg.seq_len
        self.tokens_seen += step_tokens
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        loss = totals[0] / max(counts[0], 1)
        mtp_loss = sum(totals[k] / max(counts[k], 1) for k in range(1, 1 + self.depth)) / self.depth if self.depth else 0.0
        record: dict[str, Any] = {
            "step": self.step_count, "tokens": self.tokens_seen, "loss": round(loss, 6), "mtp_loss": round(mtp_loss, 6),
            "balance_loss": round(totals[1 + self.depth] / env.dims.dp, 6),
            "grad_norm": round(grad_norm.item(), 5), "lr": lr, "batch_size": batch_size, "gamma": gamma,
            "mtp_weight": mtp_weight, "tokens_per_s": round(step_tokens / dt, 1),
            "maxvio": [round(max_violation(x), 4) for x in loads],
            "expert_load": loads.tolist(),
        }
        if self.reach is not None:  # per token and MoE layer, how many ranks and nodes its copies went to
            tokens, ranks, nodes = totals[-3:]
            record["ep_ranks_per_token"] = round(ranks / max(tokens, 1), 4)
            record["ep_nodes_per_token"] = round(nodes / max(tokens, 1), 4)
        if self.peak:
            record["mfu"] = round(self.flops_per_token * step_tokens / env.dims.world / dt / self.peak, 4)
        record["maxvio_mean"] = round(sum(record["maxvio"]) / max(len(loads), 1), 4)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {self.step_count}; lower --lr or check the data")
        return record

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self) -> RunResult:
        cfg, env = self.cfg, self.env
        self.log(f"model {self.model_name}: {self.stats.total_params:,} parameters (+{self.stats.mtp_params:,} MTP), "
                 f"{len(self.balancer.gates)} MoE layers, device {self.device}"
                 + (f", pipeline {env.dims.pp} ({cfg.pp_schedule}"
                    + (", F&B pairs overlapped on two CUDA streams" if self.pipeline and self.pipeline.streams else "")
                    + f") x {env.dims.dp} data-parallel ranks "
                    f"({env.dims.shard}), expert-parallel {env.dims.ep}" if env.dims.distributed else "") + f"; {self.total_tokens:,} tokens planned")
        from tqdm import tqdm

        bar = tqdm(total=self.total_tokens, initial=self.tokens_seen, unit=self.progress_unit, unit_scale=True,
                   dynamic_ncols=True,
                   disable=None if env.is_main else True, file=sys.stderr)
        val_loss, steps_this_run, interrupted = None, 0, False
        metrics = open(self.metrics_file, "a") if env.is_main else None
        try:
            with StopFlag() as stop:
                while self.tokens_seen < self.total_tokens:
                    record = self.step()
                    steps_this_run += 1
                    last = self.tokens_seen >= self.total_tokens
                    if (cfg.eval_every and self.step_count % cfg.eval_every == 0) or last:
                        val_loss = self.add_evaluation(record)
                    if metrics is not None:
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                    bar.update(self.tokens_seen - bar.n)
                    bar.set_postfix_str(self.progress_text(record))
                    stopping = stop.agreed(env) or bool(cfg.stop_after and steps_this_run >= cfg.stop_after)
                    if (cfg.save_every and self.step_count % cfg.save_every == 0) or last or stopping:
                        self.save()
                    if stopping and not last:
                        interrupted = True
                        why = f"signal {stop.signal}" if stop.signal else f"--stop-after {cfg.stop_after}"
                        self.log(f"\nstopped at step {self.step_count} ({why}); checkpoint saved, continue with "
                                 f"--resume --out {self.run_dir}")
                        break
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        result = RunResult(self.run_dir, self.step_count, self.tokens_seen, val_loss,
                           math.exp(val_loss) if val_loss is not None else None, None, interrupted)
        if not interrupted:
            result.sample = self.export()
        return result

    progress_unit = "tok"
    """What ``total_tokens`` and ``tokens_seen`` count (the progress bar's unit)."""

    def progress_text(self, record: dict[str, Any]) -> str:
        return (f"step {self.step_count} loss {record['loss']:.3f} lr {record['lr']:.2e} "
                f"maxvio {record['maxvio_mean']:.2f}" + (f" val {record['val_loss']:.3f}" if "val_loss" in record else ""))

    def save(self) -> None:
        self.balancer.check_replicated()
        self.checkpointer.save(self.step_count, self.model, self.optimizer, {
            "tokens": self.tokens_seen, "loader": self.loader.state_dict(),
            "model_config": self.model_config.to_hf_dict(), "train_config": self.cfg.to_dict(),
        })

    def add_evaluation(self, record: dict[str, Any]) -> float | None:
        """Evaluate now and add the results to ``record``; returns the validation loss (None if the recipe has
        none)."""
        val_loss = self.evaluate()
        record["val_loss"] = round(val_loss, 5)
        record["val_ppl"] = round(math.exp(min(val_loss, 50)), 3)
        return val_loss

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy over the first ``eval_batches x micro_batch_size`` validation windows, whatever the
        world size: each rank takes every world-th window, and all ranks run the same number of forwards
        (sharded and expert-parallel forwards are collective: a rank out of windows runs one that counts
        nothing)."""
        cfg, env = self.cfg, self.env
        n_windows = min(cfg.eval_batches * cfg.micro_batch_size, (self.val_data.n_tokens - 1) // cfg.seq_len)
        n_forwards = -(-(-(-n_windows // env.dims.dp)) // cfg.micro_batch_size)
        mine = list(iter_eval_batches(self.val_data, cfg.seq_len, cfg.micro_batch_size, return_doc_ids=cfg.doc_mask,
                                      rank=env.dp_rank, world_size=env.dims.dp, max_windows=n_windows))
        idle = next(iter_eval_batches(self.val_data, cfg.seq_len, 1, return_doc_ids=cfg.doc_mask, max_windows=1))
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.pipeline is not None:
            batches = [TrainBatch.from_window(b.tokens, cfg.seq_len, b.doc_ids).to(self.device)
                       for b in (mine + [idle] * n_forwards)[:n_forwards]]
            totals += self.pipeline.evaluate(batches, self.autocast, counted=len(mine))
            n_forwards = 0
        for i in range(n_forwards):
            batch = mine[i] if i < len(mine) else idle
            tb = TrainBatch.from_window(batch.tokens, cfg.seq_len, batch.doc_ids).to(self.device)
            with self.autocast():
                logits = self.forward(tb.inputs, doc_ids=tb.input_doc_ids).logits
            if i < len(mine):
                totals[0] += cross_entropy_sum(logits, tb.targets(0)).double()
                totals[1] += tb.targets(0).numel()
        if hasattr(self.model, "reshard"):  # FSDP2 keeps the root's parameters gathered after a forward
            self.model.reshard()             # without backward: shard them again (optimiser, checkpoint)
        self.model.train()
        env.all_reduce(totals)
        return (totals[0] / totals[1].clamp(min=1)).item()

    def export(self) -> str | None:
        """Write ``RUN/export`` (Hugging Face layout, with the tokenizer) and return the sample completion
        (rank 0; a sharded run is exported from its final checkpoint)."""
        cfg, env = self.cfg, self.env
        sample = None
        if env.is_main:
            model = self.model if not env.dims.distributed else load_checkpoint_model(self.checkpointer.latest(),
                                                                                       self.device)
            save_pretrained(model, self.run_dir / "export")
            self.tokenizer.save(self.run_dir / "export")
            sample = generate(model, self.tokenizer, cfg.sample_prompt, cfg.sample_tokens,
                              temperature=cfg.sample_temperature, top_k=cfg.sample_top_k or None, seed=cfg.seed)
        env.barrier()
        return sample


def train(cfg: TrainConfig, resume: bool = False, log=print) -> RunResult:
    """Run (or, with ``resume``, continue) the training ``cfg`` describes; see :class:`Trainer`."""
    return Trainer(cfg, resume=resume, log=log).fit()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from (they will be recomputed)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))

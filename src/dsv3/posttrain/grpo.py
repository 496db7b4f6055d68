"""Group Relative Policy Optimization (report §5.2.2, eq. 26-28; DeepSeekMath §4.1, eq. 3).

One step (:meth:`GRPOTrainer.step`): take the next prompts of the task; let dsv3's inference engine sample G
completions of each from the current policy (:class:`~dsv3.posttrain.rollout.Rollouts`: batched decode over
the latent cache); score them (:mod:`~dsv3.posttrain.rewards`); normalise the rewards within each group
(A_i = (r_i - mean) / std); then, over ``mini_batches`` parts of the rollout, minimise the clipped-ratio loss
with the k3 KL penalty to a frozen reference policy (:func:`~dsv3.posttrain.grpo_loss.grpo_loss`), and push the
new weights into the engine. The reference is the starting model, replaced by the policy every
``ref_reset_every`` steps (R1: 400) when that is set.

Defaults are sized so that a step of the ``tiny`` preset takes seconds on a CPU; the published settings
(DeepSeekMath: G 64, beta 0.04, lr 1e-6; R1: G 16, 32 prompts, beta 0.001, temperature 1, 16 mini-batches,
reference reset every 400 steps, lr 3e-6) are options (docs/posttraining.md).

Under ``torchrun`` (data parallelism) each rank rolls out, scores and trains on its share of every step's
questions (whole groups), with its own engine over the whole policy: data parallelism is DDP + ZeRO-1 here, which
keeps every rank's weights whole. The questions are dealt so that each mini-batch is the one-process run's, and
the sampling seeds follow the question, so a run on N ranks is the one-process run. Not done: expert or pipeline
parallelism under GRPO, routing replay (recording the rollout's expert choices for the training forward).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import build_empty
from ..config import ConfigError, ModelConfig
from ..inference.sampling import SamplingParams
from ..train.balance import max_violation
from ..train.expert_parallel import gathered_state_dict, reduce_expert_grads
from ..train.parallel import clip_grad_norm, world_from_env
from ..train.trainer import RunResult, Trainer
from .common import (PostTrainConfig, REPORT_PRETRAIN_PEAK_LR, cosine_schedules, export, load_start, parse_task,
                     pretrain_peak_lr, write_score)
from .grpo_loss import equal_reward_groups, group_advantages, grpo_loss, token_logprobs
from .rewards import make_reward
from .rollout import Rollouts

R1_LR = 3e-6
"""DeepSeek-R1's RL learning rate (arXiv 2501.12948)."""


@dataclass
class GRPOConfig(PostTrainConfig):
    steps: int = 40
    """GRPO steps (each: one rollout and its updates)."""
    reward: str | None = None
    """None: the built-in task's reward (1 right, 0.1 a boxed wrong answer, 0 none); ``boxed``, ``code``,
    ``module:function``, an ``http(s)://`` URL or ``rm:PATH``, a reward model's score (dsv3.posttrain.rewards)."""
    prompts_per_step: int = 8
    """Questions per step (R1: 32)."""
    group_size: int = 8
    """G, completions sampled per question (DeepSeekMath: 64; R1: 16)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (R1: 1.0)."""
    top_p: float = 1.0
    max_new_tokens: int = 32
    """Longest completion (tokens)."""
    eps: float = 0.2
    """Clip range epsilon of the ratio (DeepSeekMath / PPO: 0.2)."""
    eps_high: float = 0.0
    """Upper clip range (DAPO's clip-higher: 0.28); 0 = ``eps``."""
    beta: float = 0.04
    """Weight of the KL penalty (DeepSeekMath: 0.04; R1: 0.001; 0 = no reference model)."""
    loss_norm: str = "sequence"
    """``sequence`` (DeepSeekMath eq. 3: mean over completions of their token means), ``token`` (DAPO: over all
    tokens) or ``constant`` (Dr. GRPO: sum / (completions x max_new_tokens))."""
    advantage_scale: str = "std"
    """``std``: (r - mean) / std within a group; ``none``: r - mean (Dr. GRPO)."""
    mini_batches: int = 1
    """Policy updates per rollout, each on a part of it (DeepSeekMath: 1; R1: 16)."""
    ref_reset_every: int = 0
    """Replace the reference model by the policy every N steps (R1: 400); 0 = keep the starting model."""
    micro_batch_size: int = 64
    """Completions per forward / backward."""
    batch_size: int = 64
    """(Unused by GRPO: a step's batch is prompts_per_step x group_size.)"""
    seq_len: int = 256
    """Longest prompt + completion the engine holds."""
    lr: float = 0.0
    """Learning rate (constant); 0 = R1's 3e-6 scaled to the model like SFT's (x the checkpoint's pre-training
    peak / 2.2e-4), or 3e-6 for a checkpoint without a training record."""
    warmup: float = 0.0
    eval_every: int = 10
    """Held-out greedy accuracy every N steps (and at the end)."""
    eval_problems: int = 100
    save_every: int = 20

    def validate(self) -> None:
        super().validate()
        for name in ("prompts_per_step", "max_new_tokens", "mini_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)!r}")
        if self.group_size < 2:
            raise ConfigError(f"group_size: must be >= 2 (advantages compare completions of one question), "
                              f"got {self.group_size!r}")
        if (self.prompts_per_step * self.group_size) % self.mini_batches:
            raise ConfigError(f"mini_batches: {self.mini_batches} must divide prompts_per_step x group_size = "
                              f"{self.prompts_per_step * self.group_size}")
        if self.loss_norm not in ("sequence", "token", "constant"):
            raise ConfigError(f"loss_norm: must be 'sequence', 'token' or 'constant', got {self.loss_norm!r}")
        if self.advantage_scale not in ("std", "none"):
            raise ConfigError(f"advantage_scale: must be 'std' or 'none', got {self.advantage_scale!r}")
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ConfigError("temperature must be > 0 and top_p in (0, 1] (GRPO samples its groups)")
        if self.eps <= 0 or self.eps_high < 0 or self.beta < 0 or self.ref_reset_every < 0:
            raise ConfigError("eps must be > 0; eps_high, beta and ref_reset_every >= 0")


class ProblemStream:
    """The task's training problems in order; its state is the next index (exact resume)."""

    def __init__(self, task):
        self.task, self.position = task, 0

    def take(self, n: int):
        problems = self.task.problems(n, "train", self.position)
        self.position += n
        return problems

    def state_dict(self) -> dict:
        return {"position": self.position, "task": repr(self.task)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("task") != repr(self.task):
            raise ValueError(f"saved for task {state.get('task')}, this run's is {self.task!r}")
        self.position = int(state["position"])


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=4).digest(), "little")


class GRPOTrainer(Trainer):
    cfg: GRPOConfig
    run_prefix = "grpo"
    progress_unit = "step"

    def __init__(self, cfg: GRPOConfig, resume: bool = False, log=print):
        self.model_name = str(cfg.checkpoint)
        self.reference_step = 0
        if cfg.dp_shard == "fsdp":
            raise ConfigError("dp_shard: dsv3 grpo keeps the whole policy on every rank for its engine: ZeRO-1 "
                              "(the default here), not FSDP2")
        if cfg.pp > 1:
            raise ConfigError("dsv3 grpo runs with data and expert parallelism (no --pp yet)")
        # a step's batch is prompts_per_step x group_size, whatever the world: batch_size only has to pass the
        # trainer's check
        _, _, world = world_from_env()
        cfg = dataclasses.replace(cfg, dp_shard="zero1", batch_size=cfg.micro_batch_size * world)
        super().__init__(cfg, resume=resume, log=log)
        dp, per_update = self.env.dims.dp, cfg.prompts_per_step // cfg.mini_batches
        if dp > 1 and (cfg.prompts_per_step % cfg.mini_batches or per_update % dp):
            raise ConfigError(f"prompts_per_step: {cfg.prompts_per_step} questions must split into mini_batches x "
                              f"data-parallel ranks = {cfg.mini_batches} x {dp} equal shares (whole groups per rank)")
        self.rollouts.push(self._policy_state())  # a resumed policy
        self.log(f"rollouts: {self.rollouts.describe()}")

    # ---------------------------------------------------------------------------------------- recipe hooks
    def build_data(self) -> None:
        cfg = self.cfg
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.task = parse_task(cfg.task_digits, cfg.task_ops, cfg.seed)
        self.reward = make_reward(cfg.reward, self.task, self.device)
        self._start = load_start(cfg.checkpoint, self.device)
        _, self.tokenizer, self.template = self._start

    def build_model(self) -> tuple[ModelConfig, torch.nn.Module]:
        cfg = self.cfg
        model = self._start[0]
        self._start = None
        model.mtp.requires_grad_(False)  # GRPO trains the main model: its forward never runs the MTP modules
        self.rollouts = Rollouts(model, self.tokenizer, self.template, self.device,
                                 max_batch=min(256, cfg.prompts_per_step * cfg.group_size), max_seq_len=cfg.seq_len,
                                 compile=cfg.compile)
        self.reference = None
        if cfg.beta > 0:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        return model.config, model

    def build_loader(self) -> ProblemStream:
        return ProblemStream(self.task)

    def build_schedules(self):
        cfg = self.cfg
        peak = pretrain_peak_lr(cfg.checkpoint)
        lr = cfg.lr or (R1_LR if peak is None else R1_LR * peak / REPORT_PRETRAIN_PEAK_LR)
        self.log(f"GRPO: {cfg.steps} steps of {cfg.prompts_per_step} questions x {cfg.group_size} completions, "
                 f"lr {lr:.3g}, beta {cfg.beta}, eps {cfg.eps}, loss {cfg.loss_norm}, {cfg.mini_batches} update(s) "
                 f"per rollout")
        return cfg.steps, cosine_schedules(cfg.steps, lr, 1.0, 0.0, 1, mtp_weight=0.0)

    # ---------------------------------------------------------------------------------------- one step
    def _rows(self, prompts: list[list[int]], completions: list[list[int]]):
        """Prompt + completion rows, right-padded: inputs (B, L-1), targets (B, L-1) and the completion mask."""
        rows = [p + c for p, c in zip(prompts, completions)]
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id
        tokens = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), length - 1, dtype=torch.bool)
        for i, (p, r) in enumerate(zip(prompts, rows)):
            tokens[i, :len(r)] = torch.tensor(r)
            mask[i, len(p) - 1:len(r) - 1] = True  # target j is token j + 1: the completion's tokens
        return tokens[:, :-1].to(self.device), tokens[:, 1:].to(self.device), mask.to(self.device)

    def _logp(self, model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits = model(inputs).logits
        return token_logprobs(logits, targets)

    def step(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        if cfg.ref_reset_every and self.step_count and self.step_count % cfg.ref_reset_every == 0 \
                and self.reference is not None and self.reference_step != self.step_count:
            self._reset_reference()
        lr = self.sched.lr(self.tokens_seen)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        # ---- rollouts: G completions per question by the engine, from the current policy (this rank's questions)
        every = self.loader.take(cfg.prompts_per_step)
        mine = self._my_questions()
        problems = [every[i] for i in mine]
        prompt_ids = [self.rollouts.prompt_ids(p) for p in problems]
        requests, params = [], []
        for i, ids in zip(mine, prompt_ids):
            for g in range(cfg.group_size):
                requests.append(ids)
                params.append(SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                             top_p=cfg.top_p, seed=_seed(cfg.seed, self.step_count, i, g)))
        results = self.rollouts.complete(requests, params)
        completions = [r.tokens for r in results]
        texts = [r.text or "" for r in results]
        n_generated = sum(len(c) for c in completions)
        t_rollout = time.perf_counter() - t0

        # ---- rewards and group-normalised advantages
        rewards_list = self.reward([p.prompt for p in problems for _ in range(cfg.group_size)], texts,
                                   [p.answer for p in problems for _ in range(cfg.group_size)])
        rewards = torch.tensor(rewards_list, dtype=torch.float32).view(len(problems), cfg.group_size)
        advantages = group_advantages(rewards, cfg.advantage_scale).flatten().to(self.device)

        # ---- policy updates over mini-batches of the rollout
        t1 = time.perf_counter()
        inputs, targets, mask = self._rows(requests, completions)
        n = inputs.shape[0]
        old_logp = None
        if cfg.mini_batches > 1:  # the sampling policy's log-probabilities, before the first update
            with torch.no_grad():
                old_logp = torch.cat([self._logp(self.forward, inputs[i:i + cfg.micro_batch_size],
                                                 targets[i:i + cfg.micro_batch_size])
                                      for i in range(0, n, cfg.micro_batch_size)])
        part = n // cfg.mini_batches
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # loss, kl, clipped, ratio, tokens
        grad_norm = torch.zeros((), device=self.device)
        self.balancer.start_step(-(-part // cfg.micro_batch_size))  # micro-batches per update
        for m in range(cfg.mini_batches):
            rows = range(m * part, (m + 1) * part)
            # this rank's share of the mini-batch's denominator: DDP averages the ranks' gradients
            denominator = {"sequence": float(part), "token": self._token_share(mask[rows.start:rows.stop]),
                           "constant": float(part * cfg.max_new_tokens)}[cfg.loss_norm]
            for i in range(rows.start, rows.stop, cfg.micro_batch_size):
                j = min(i + cfg.micro_batch_size, rows.stop)
                ref = None
                if self.reference is not None:
                    with torch.no_grad():
                        ref = self._logp(self.reference, inputs[i:j], targets[i:j])
                with self.grad_sync(j == rows.stop):  # gradients reduced over the ranks with the last one
                    logp = self._logp(self.forward, inputs[i:j], targets[i:j])
                    old = logp.detach() if old_logp is None else old_logp[i:j]
                    loss, stats = grpo_loss(logp, old, ref, advantages[i:j], mask[i:j], eps_low=cfg.eps,
                                            eps_high=cfg.eps_high or None, beta=cfg.beta, norm=cfg.loss_norm,
                                            max_len=cfg.max_new_tokens, denominator=denominator)
                    loss.backward()
                t = stats["tokens"].double()
                sums += torch.stack([loss.detach().double(), stats["kl"].double() * t,
                                     stats["clip_fraction"].double() * t, stats["ratio"].double() * t, t])
            if self.env.dims.ep > 1:  # DDP leaves the experts alone: their gradients' mean over the ranks
                reduce_expert_grads(self.model, self.env)
            grad_norm = clip_grad_norm(self.model, cfg.grad_clip, self.env, None)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        loads = self.balancer.take_loads()
        self.balancer.update_bias(loads, 0.0)  # routing biases frozen in post-training
        balance_loss = self.balancer.take_loss()
        self.rollouts.push(self._policy_state())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t_train = time.perf_counter() - t1
        self.step_count += 1
        self.tokens_seen += 1
        # ---- the record, over every rank's questions (in the step's question order)
        shape = (cfg.prompts_per_step, cfg.group_size)
        every_rewards = torch.zeros(shape, dtype=torch.float64, device=self.device)
        every_lengths = torch.zeros(shape, dtype=torch.float64, device=self.device)
        every_rewards[mine] = rewards.double().to(self.device)
        every_lengths[mine] = torch.tensor([len(c) for c in completions], dtype=torch.float64,
                                           device=self.device).view(len(mine), cfg.group_size)
        counts = torch.tensor([n_generated, int(mask.shape[1] + 1) * n], dtype=torch.float64, device=self.device)
        for t in (sums, every_rewards, every_lengths, counts):
            self.env.all_reduce(t)
        loss, kl, clipped, ratio, tokens = sums.tolist()
        n_generated, n_trained = counts.tolist()
        rewards_flat = every_rewards.flatten().float()
        record: dict[str, Any] = {
            "step": self.step_count, "tokens": self.tokens_seen,
            "loss": round(loss / cfg.mini_batches / self.env.dims.dp, 6),
            "reward": round(rewards_flat.mean().item(), 4), "reward_std": round(rewards_flat.std().item(), 4),
            "accuracy": round((rewards_flat == 1.0).float().mean().item(), 4),
            "kl": round(kl / max(tokens, 1), 6), "clip_fraction": round(clipped / max(tokens, 1), 5),
            "ratio": round(ratio / max(tokens, 1), 5),
            "response_length": round(every_lengths.mean().item(), 2),
            "equal_reward_groups": equal_reward_groups(every_rewards.float().cpu()),
            "grad_norm": round(float(grad_norm), 5), "lr": lr, "balance_loss": round(float(balance_loss), 6),
            "rollout_s": round(t_rollout, 3), "train_s": round(t_train, 3),
            "rollout_tokens_per_s": round(n_generated / max(t_rollout, 1e-9), 1),
            "train_tokens_per_s": round(n_trained / max(t_train, 1e-9), 1),
            "expert_load": loads.tolist(),
        }
        record["maxvio"] = [round(max_violation(x), 4) for x in loads]
        record["maxvio_mean"] = round(sum(record["maxvio"]) / max(len(loads), 1), 4)
        return record

    def _my_questions(self) -> list[int]:
        """This rank's questions of a step (indices into its ``prompts_per_step``): each mini-batch's questions
        dealt over the ranks, so that the ranks' m-th mini-batches together are the one-process run's m-th."""
        cfg, dp, rank = self.cfg, self.env.dims.dp, self.env.dp_rank
        if dp == 1:  # one process: every question (a mini-batch may then also split a group)
            return list(range(cfg.prompts_per_step))
        per_update = cfg.prompts_per_step // cfg.mini_batches
        share = per_update // dp
        return [m * per_update + rank * share + i for m in range(cfg.mini_batches) for i in range(share)]

    def _token_share(self, mask: torch.Tensor) -> torch.Tensor:
        """A mini-batch's completion tokens on every rank, over the ranks (DDP averages the gradients): this
        rank's denominator for the token-level loss."""
        total = mask.sum().double()
        if self.env.dims.distributed:
            total = self.env.all_reduce(total.clone()) / self.env.dims.dp
        return total.float()

    def progress_text(self, record: dict[str, Any]) -> str:
        return (f"step {self.step_count} reward {record['reward']:.3f} acc {record['accuracy']:.2f} "
                f"kl {record['kl']:.4f} len {record['response_length']:.1f}"
                + (f" eval {record['eval_accuracy']:.2f}" if "eval_accuracy" in record else ""))

    # ---------------------------------------------------------------------------------------- reference model
    def _reference_file(self, step: int) -> Path:
        return self.run_dir / "checkpoints" / f"reference_step_{step}.safetensors"

    def _reset_reference(self) -> None:
        self.reference.load_state_dict(self._policy_state())
        self.reference_step = self.step_count
        if self.env.is_main:  # kept for exact resume; only the newest is needed
            path = self._reference_file(self.step_count)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in self.reference.state_dict().items()},
                      str(path.with_suffix(".tmp")))
            path.with_suffix(".tmp").rename(path)
            for old in path.parent.glob("reference_step_*.safetensors"):
                if old != path:
                    old.unlink()

    def save(self) -> None:
        self.checkpointer.save(self.step_count, self.model, self.optimizer, {
            "tokens": self.tokens_seen, "loader": self.loader.state_dict(), "reference_step": self.reference_step,
            "model_config": self.model_config.to_hf_dict(), "train_config": self.cfg.to_dict(),
        })

    def _resume(self, ckpt: Path) -> None:
        super()._resume(ckpt)
        from ..train.state import read_meta

        self.reference_step = int(read_meta(ckpt).get("reference_step", 0))
        if self.reference_step and self.reference is not None:
            state = load_file(str(self._reference_file(self.reference_step)), device=str(self.device))
            self.reference.load_state_dict(state)

    # ---------------------------------------------------------------------------------------- evaluation, export
    def add_evaluation(self, record: dict[str, Any]) -> float | None:
        if self.cfg.eval_problems and self.env.is_main:  # rank 0 writes the record; its engine holds the policy
            score = self.rollouts.score(self.task, self.task.problems(self.cfg.eval_problems, "test"),
                                        self.cfg.max_new_tokens)
            record["eval_accuracy"] = round(score.accuracy, 4)
            record["eval_formatted"] = round(score.formatted, 4)
        return None

    def evaluate(self) -> float:
        return float("nan")

    def export(self) -> str | None:
        """RUN/export and the held-out score (rank 0; with expert parallelism from the gathered experts)."""
        model = self.model
        if self.env.dims.ep > 1:  # every rank takes part in the gather; rank 0 writes a whole model
            state = self._policy_state()
            if self.env.is_main:
                model = build_empty(self.model_config, "cpu", torch.float32)
                model.load_state_dict(state)
        out = self._export(model) if self.env.is_main else None
        self.env.barrier()
        return out

    def _policy_state(self) -> dict[str, torch.Tensor]:
        """The whole policy's state dict: the model's own, with expert parallelism its experts gathered from
        the ranks (every rank calls it)."""
        if self.env.dims.ep > 1:
            return gathered_state_dict(self.model, self.env)
        return self.model.state_dict()

    def _export(self, model: torch.nn.Module) -> str | None:
        export(model, self.tokenizer, self.template, self.run_dir / "export")
        if not self.cfg.eval_problems:
            return None
        score = self.rollouts.score(self.task, self.task.problems(self.cfg.eval_problems, "test"),
                                    self.cfg.max_new_tokens)
        write_score(self.run_dir, score)
        self.log(f"held-out {self.task.name} accuracy after GRPO: {score.accuracy:.1%} ({score.problems} problems)")
        return f"accuracy {score.accuracy:.1%}"


def grpo(cfg: GRPOConfig, resume: bool = False, log=print) -> RunResult:
    """Run (or continue) the GRPO training ``cfg`` describes."""
    return GRPOTrainer(cfg, resume=resume, log=log).fit()

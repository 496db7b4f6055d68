"""Every setting of a training run in one dataclass, loadable from YAML or TOML.

A config file holds trainer fields at the top level and model fields (any :class:`dsv3.ModelConfig` field,
overriding the preset) under ``model``::

    preset: tiny
    steps: 500
    lr: 3.0e-3
    model:
      num_hidden_layers: 6
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, ModelConfig, preset
from ..data.tokenizer import SPECIAL_TOKENS
from .schedules import PAPER_CONSTANT_UNTIL, PAPER_TOTAL

MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)
"""Smallest vocabulary of a BPE trained here: every byte and the special tokens."""
MAX_WARMUP = PAPER_CONSTANT_UNTIL / PAPER_TOTAL
"""Warm-up must end before the constant stage does (10T of 14.8T tokens in the report)."""


def default_cache_dir() -> str:
    return os.environ.get("DSV3_CACHE", str(Path.home() / ".cache" / "dsv3"))


@dataclass
class TrainConfig:
    preset: str = "tiny"
    """Model preset the run starts from (``tiny``, ``16b``, ``v3-671b``)."""
    model: dict[str, Any] = field(default_factory=dict)
    """Overrides of ModelConfig fields. ``vocab_size`` always follows the tokenizer."""
    data: str | None = None
    """Text/JSONL file or directory; None = the running Python's standard library sources."""
    tokenizer: str | None = None
    """A Hugging Face tokenizer.json (or its directory); None = a byte-level BPE trained on ``data`` (cached)."""
    vocab_size: int = 4096
    """Vocabulary of the BPE trained when no tokenizer is given."""
    cache_dir: str = field(default_factory=default_cache_dir)
    """Where trained tokenizers and token files are kept between runs."""
    out: str | None = None
    """Run directory (checkpoints, metrics.jsonl, plots, export); default runs/<preset>-<time>."""
    steps: int = 300
    """Token budget of the run in full-size batches: total tokens = steps * batch_size * seq_len."""
    seq_len: int = 256
    batch_size: int = 16
    """Global batch in sequences after the ramp."""
    micro_batch_size: int = 16
    """Sequences per forward/backward; the batch is reached by gradient accumulation."""
    batch_ramp: bool = True
    """Ramp the batch from 0.2x (report: 3072 -> 15360) over the report's share of the run, in whole
    micro-batches: it only acts when ``micro_batch_size`` is below ``batch_size``."""
    lr: float = 3e-3
    """Peak learning rate (report: 2.2e-4 for 671B; small models take larger ones)."""
    warmup: float = 0.05
    """Warm-up as a fraction of the run's tokens."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    bf16_moments: bool = False
    """Keep AdamW's moments in BF16 (report §3.3) instead of FP32."""
    balance: str = "aux_free"
    """``aux_free``: bias update (report); ``aux_loss``: conventional auxiliary loss (ablation)."""
    gamma: float = 0.001
    """Bias update speed; 0 for the last 500B/14.8T of the run as in the report."""
    seq_aux_alpha: float = 1e-4
    """Weight of the complementary sequence-wise balance loss (report: 0.0001)."""
    aux_loss_alpha: float = 0.01
    """Weight of the conventional auxiliary loss when ``balance`` is ``aux_loss``."""
    mtp: bool = True
    """Train the MTP module(s) with the report's lambda schedule (0.3 then 0.1)."""
    fim_rate: float = 0.1
    doc_mask: bool = False
    """Keep packed documents from attending to each other (the report uses no such mask)."""
    eval_every: int = 100
    eval_batches: int = 16
    save_every: int = 100
    keep_last: int = 3
    device: str = "auto"
    """``auto`` (CUDA when there is a GPU), ``cpu`` or ``cuda``; under torchrun each rank takes cuda:LOCAL_RANK."""
    dp_shard: str = "auto"
    """How data parallelism (the torchrun ranks of one pipeline stage) shards the training state: ``fsdp`` (FSDP2:
    parameters, gradients and optimiser states), ``zero1`` (gradient all-reduce + sharded AdamW states, the
    report's ZeRO-1) or ``auto`` (FSDP2 without a pipeline, ZeRO-1 with one)."""
    ep: int = 1
    """Expert parallelism: the routed experts of each MoE layer split over groups of this many ranks (it must
    divide the data-parallel size and the number of experts)."""
    node_limited: bool = False
    """Node-limited routing (report §2.1.2): require every routing group (``n_group``) to lie on the ranks of one
    node, so that a token reaches at most ``topk_group`` nodes; an error names the numbers otherwise."""
    ranks_per_node: int = 0
    """Consecutive ranks sharing a node, for node-limited routing and the nodes-per-token metric (0: torchrun's
    LOCAL_WORLD_SIZE)."""
    pp: int = 1
    """Pipeline parallelism: the model cut into stages over this many ranks (world = pp x data-parallel)."""
    pp_schedule: str = "1f1b"
    """``1f1b``, ``dualpipev`` (P ranks hold 2P stages; first and last stage on rank 0) or ``dualpipe`` (two
    copies of the model fed from both ends; parameters 2x); the DualPipes need an even number of at least 2 x pp
    micro-batches per rank and step."""
    pp_overlap: str = "off"
    """Run the forward and the backward of each overlapped pair of a DualPipe schedule on two CUDA streams at once
    (``on``), one after the other (``off``), or ``auto``: on with CUDA, off on the CPU (which has no streams).
    Off by default: on one GPU the overlap gained nothing and cost memory (docs/parallelism.md)."""
    seed: int = 0
    fp8: bool = False
    """FP8 GEMMs for the Linear layers of attention and experts (report §3.3)."""
    fp8_dispatch: bool = False
    """Send the tokens to their experts' ranks in FP8 with 1x128 scales, dequantised on arrival (report §3.3.4:
    about half the dispatch traffic of BF16); the outputs come back unquantised. Needs ``ep`` > 1."""
    compile: bool = False
    sample_prompt: str = "def fibonacci(n):"
    """Prompt of the sample printed at the end. End it where a token ends: the BPE learns a newline and the
    indentation after it as one token, so a prompt ending in a bare newline starts the model mid-token."""
    sample_tokens: int = 64
    sample_temperature: float = 0.8
    """Temperature of the final sample (0 = greedy: a small model then repeats one line)."""
    sample_top_k: int = 20
    """The final sample draws among this many most likely tokens (0 = all); its seed is ``seed``."""
    stop_after: int | None = None
    """Stop with a checkpoint after this many steps of this invocation (experiments and tests)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (types first, then ranges); raise :class:`ConfigError` naming the field.

        Numbers written as strings (YAML 1.1 reads ``1e-3`` as a string, so ``--set gamma=1e-3`` and
        ``lr: 3e-3`` in a YAML file arrive as text) are converted when they parse as numbers.
        """

        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"{name}: must be {allowed}, got {getattr(self, name)!r}")

        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, str):
                try:
                    setattr(self, name, float(v))
                except ValueError:
                    pass
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), name, "a number")
        for name in _INT_FIELDS:
            v = getattr(self, name)
            optional = name == "stop_after"
            need((optional and v is None) or (isinstance(v, int) and not isinstance(v, bool)), name,
                 "an integer" + (" or None" if optional else ""))
        for name in _BOOL_FIELDS:
            need(isinstance(getattr(self, name), bool), name, "true or false")
        for name in _PATH_FIELDS:
            v = getattr(self, name)
            if isinstance(v, os.PathLike):
                setattr(self, name, os.fspath(v))
            need(getattr(self, name) is None or isinstance(getattr(self, name), str), name, "a path (string)")
        if isinstance(self.pp_overlap, bool):  # YAML reads on / off as booleans
            self.pp_overlap = "on" if self.pp_overlap else "off"
        for name in ("preset", "balance", "device", "sample_prompt", "cache_dir", "dp_shard",
                     "pp_schedule", "pp_overlap"):
            need(isinstance(getattr(self, name), str), name, "a string")

        for name in ("steps", "seq_len", "batch_size", "micro_batch_size", "vocab_size", "eval_batches",
                     "keep_last"):
            need(getattr(self, name) >= 1 or (getattr(self, name) == 0 and name in self.derived_when_zero()), name,
                 "an integer >= 1")
        for name in ("eval_every", "save_every"):
            need(getattr(self, name) >= 0, name, "an integer >= 0 (0 = only at the end)")
        need(self.sample_tokens >= 0, "sample_tokens", "an integer >= 0")
        need(self.sample_temperature >= 0, "sample_temperature", ">= 0 (0 = greedy)")
        need(self.sample_top_k >= 0, "sample_top_k", "an integer >= 0 (0 = all tokens)")
        need(self.batch_size % self.micro_batch_size == 0, "batch_size",
             f"a multiple of micro_batch_size ({self.micro_batch_size})")
        need(self.tokenizer is not None or self.vocab_size >= MIN_BPE_VOCAB, "vocab_size",
             f">= {MIN_BPE_VOCAB} (256 bytes + {MIN_BPE_VOCAB - 256} special tokens) for the trained BPE")
        need(0 < self.lr < 1 or (self.lr == 0 and "lr" in self.derived_when_zero()), "lr", "a number in (0, 1)")
        need(0 <= self.warmup <= MAX_WARMUP, "warmup",
             f"a fraction in [0, {MAX_WARMUP:.3f}] (the constant stage ends at 10T/14.8T of the run)")
        need(0 <= self.weight_decay < 1, "weight_decay", "in [0, 1)")
        need(0 <= self.beta1 < 1, "beta1", "in [0, 1)")
        need(0 <= self.beta2 < 1, "beta2", "in [0, 1)")
        need(self.grad_clip > 0, "grad_clip", "> 0")
        need(self.balance in ("aux_free", "aux_loss"), "balance", "'aux_free' or 'aux_loss'")
        need(self.gamma >= 0, "gamma", ">= 0")
        need(self.seq_aux_alpha >= 0, "seq_aux_alpha", ">= 0")
        need(self.aux_loss_alpha >= 0, "aux_loss_alpha", ">= 0")
        need(0 <= self.fim_rate <= 1, "fim_rate", "in [0, 1]")
        need(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"), "device",
             "'auto', 'cpu' or 'cuda[:N]'")
        need(self.dp_shard in ("auto", "fsdp", "zero1"), "dp_shard", "'auto', 'fsdp' or 'zero1'")
        need(self.ep >= 1, "ep", "an integer >= 1")
        need(self.pp >= 1, "pp", "an integer >= 1")
        need(self.ranks_per_node >= 0, "ranks_per_node", "an integer >= 0 (0: torchrun's LOCAL_WORLD_SIZE)")
        need(not self.node_limited or self.ep > 1, "node_limited",
             "false unless --ep > 1 (node-limited routing places the routing groups on expert-parallel ranks)")
        need(not self.fp8_dispatch or self.ep > 1, "fp8_dispatch",
             "false unless --ep > 1 (--fp8-dispatch quantises the expert-parallel all-to-all)")
        need(self.pp_schedule in ("1f1b", "dualpipev", "dualpipe"), "pp_schedule", "'1f1b', 'dualpipev' or 'dualpipe'")
        need(self.pp_overlap in ("auto", "on", "off"), "pp_overlap", "'auto', 'on' or 'off'")
        need(self.pp_overlap != "on" or (self.pp > 1 and self.pp_schedule != "1f1b"), "pp_overlap",
             "'on' only with --pp > 1 and a DualPipe schedule (the others have no overlapped pairs)")
        need(self.stop_after is None or self.stop_after >= 1, "stop_after", "None or >= 1")
        need(isinstance(self.model, dict), "model", "a mapping of ModelConfig fields")
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        for key in self.model:
            if key not in known:
                raise ConfigError(f"model.{key}: not a ModelConfig field")
        mcfg = self.model_config(vocab_size=self.vocab_size)  # validates preset and overrides
        need(mcfg.n_routed_experts % self.ep == 0, "ep",
             f"a divisor of the routed experts per layer ({mcfg.n_routed_experts})")

    def derived_when_zero(self) -> frozenset[str]:
        """Fields whose value 0 means "derive it" (post-training recipes); pre-training needs numbers."""
        return frozenset()

    def model_config(self, vocab_size: int) -> ModelConfig:
        overrides = {k: v for k, v in self.model.items() if k != "vocab_size"}
        try:
            return preset(self.preset).replace(vocab_size=vocab_size, **overrides)
        except ConfigError as e:
            raise ConfigError(f"model.{e}") from None

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """Read a YAML (.yaml/.yml) or TOML (.toml) file; ``overrides`` (e.g. CLI flags) win."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}")
        text = path.read_text()
        if path.suffix in (".toml",):
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml", ".json"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config: {path} must end in .yaml, .yml, .toml or .json")
        if not isinstance(data, dict):
            raise ConfigError(f"config: {path} must hold a mapping of fields")
        merged = {**data, **overrides}
        if isinstance(data.get("model"), dict) and isinstance(overrides.get("model"), dict):
            merged["model"] = {**data["model"], **overrides["model"]}  # --set model.X adds to the file's
        return cls.from_dict(merged)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(f"{key}: not a training field (see `dsv3 train --help`)")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


_FLOAT_FIELDS = ("lr", "warmup", "weight_decay", "beta1", "beta2", "grad_clip", "gamma", "seq_aux_alpha",
                 "aux_loss_alpha", "fim_rate", "sample_temperature")
_INT_FIELDS = ("steps", "seq_len", "batch_size", "micro_batch_size", "vocab_size", "eval_every", "eval_batches",
               "save_every", "keep_last", "seed", "sample_tokens", "sample_top_k", "stop_after", "ep", "pp",
               "ranks_per_node")
_BOOL_FIELDS = ("batch_ramp", "bf16_moments", "mtp", "doc_mask", "fp8", "fp8_dispatch", "node_limited", "compile")
_PATH_FIELDS = ("data", "tokenizer", "out", "cache_dir")

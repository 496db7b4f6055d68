"""Model configuration: every architectural hyperparameter of DeepSeek-V3 in one dataclass.

Field names are those of the official checkpoint's ``config.json`` (report §2 and §4.2 give the values of
the 671B model), so a reader can compare a preset with a published file line by line. Keys of a
``config.json`` that do not shape the model (``architectures``, ``torch_dtype``, ``auto_map`` ...) are
kept in :attr:`ModelConfig.extra` and written back unchanged, which makes read -> write round-trip exact.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config_formats


class ConfigError(ValueError):
    """A configuration value is out of its allowed range; the message names the field."""


class ConfigWarning(UserWarning):
    """A config file holds keys dsv3 does not read, or does not say which model type it describes."""


@dataclass
class ModelConfig:
    """Architecture of a DeepSeek-V3 model. Defaults are the 671B model of the report (preset ``v3-671b``)."""

    vocab_size: int = 129280
    """Vocabulary size (byte-level BPE, §4.2: 128K tokens)."""
    hidden_size: int = 7168
    """Model width d (§4.2)."""
    intermediate_size: int = 18432
    """Inner width of the dense SwiGLU FFN used by the first ``first_k_dense_replace`` layers."""
    moe_intermediate_size: int = 2048
    """Inner width of each routed and shared expert (§4.2: 2048)."""
    num_hidden_layers: int = 61
    """Number of Transformer blocks of the main model, MTP modules excluded."""
    first_k_dense_replace: int = 3
    """The first k layers use a dense FFN instead of MoE (§4.2: 3)."""
    num_attention_heads: int = 128
    """Attention heads n_h (§4.2: 128)."""
    q_lora_rank: int | None = 1536
    """Query compression dimension d_c' (eq. 6); ``None`` projects queries directly (no compression)."""
    kv_lora_rank: int = 512
    """KV compression dimension d_c (eq. 1); with ``qk_rope_head_dim`` it is all the cache holds per token."""
    qk_nope_head_dim: int = 128
    """Per-head dimension d_h of the query/key part without position (eq. 2, 7)."""
    qk_rope_head_dim: int = 64
    """Per-head dimension d_h^R of the decoupled RoPE query and the shared RoPE key (eq. 3, 8)."""
    v_head_dim: int = 128
    """Per-head value dimension (eq. 5)."""
    n_routed_experts: int = 256
    """Routed experts N_r per MoE layer (§2.1.2)."""
    n_shared_experts: int = 1
    """Shared experts N_s per MoE layer; they are computed as one SwiGLU of width N_s * moe_intermediate_size."""
    num_experts_per_tok: int = 8
    """Routed experts K_r activated per token."""
    n_group: int = 8
    """Expert groups for group(node)-limited routing; 1 disables the group restriction."""
    topk_group: int = 4
    """Groups a token may route to (§2.1.2: at most 4 nodes)."""
    routed_scaling_factor: float = 2.5
    """Factor multiplying the normalised routed gate values."""
    scoring_func: str = "sigmoid"
    """Affinity function: ``sigmoid`` (V3, eq. 15) or ``softmax`` (DeepSeek-V2 checkpoints)."""
    topk_method: str = "noaux_tc"
    """``noaux_tc``: selection uses the bias ``e_score_correction_bias`` (aux-loss-free balancing, §2.1.2);
    ``greedy`` / ``group_limited_greedy``: V2-style routing without a bias."""
    norm_topk_prob: bool = True
    """Normalise the selected gate values to sum to one (eq. 13) before scaling."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base."""
    max_position_embeddings: int = 163840
    """Longest context the model is configured for (after YaRN extension: 128K in the report, §4.3)."""
    rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    )
    """YaRN context extension applied to the decoupled RoPE (§4.3); ``None`` for plain RoPE."""
    num_nextn_predict_layers: int = 1
    """Multi-Token Prediction depth D (§2.2: 1)."""
    initializer_range: float = 0.006
    """Standard deviation of the random initialisation (§4.2: 0.006)."""
    tie_word_embeddings: bool = False
    """DeepSeek-V3 keeps the embedding and output head separate."""
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    quantization_config: dict[str, Any] | None = None
    """Present in FP8 checkpoints: ``{"quant_method": "fp8", "weight_block_size": [128, 128], ...}``."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other keys of config.json, kept verbatim for an exact round trip."""
    absent: dict[str, Any] = field(default_factory=dict, repr=False)
    """Fields the config.json read did not have, with the value each was given: written back only if changed."""
    key_order: tuple[str, ...] = field(default=(), repr=False, compare=False)
    """The order of the keys of the config.json read, kept when writing it back."""

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------------------
    # derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def uses_bias_routing(self) -> bool:
        """Aux-loss-free routing: a per-expert bias that only affects which experts are chosen."""
        return self.topk_method == "noaux_tc"

    def is_moe_layer(self, layer_id: int) -> bool:
        """Layer ``layer_id`` (MTP modules continue the numbering after the main layers) is an MoE layer."""
        return layer_id >= self.first_k_dense_replace and self.n_routed_experts > 0

    @property
    def yarn(self) -> dict[str, Any] | None:
        """The YaRN parameters when RoPE scaling of type yarn is configured, else ``None``."""
        rs = self.rope_scaling
        if not rs:
            return None
        kind = rs.get("type", rs.get("rope_type"))
        return rs if kind == "yarn" else None

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_h + d_h^R), times mscale^2 under YaRN (§4.3: sqrt(t) = 0.1 ln s + 1)."""
        scale = self.qk_head_dim**-0.5
        y = self.yarn
        if y is not None and y.get("mscale_all_dim"):
            m = yarn_mscale(float(y["factor"]), float(y["mscale_all_dim"]))
            scale *= m * m
        return scale

    # ----------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field outside its allowed range."""

        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"{name}: must be {allowed}, got {getattr(self, name)!r}")

        def positive(name: str) -> None:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, "an integer >= 1")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            positive(name)
        for name in ("qk_nope_head_dim", "intermediate_size", "moe_intermediate_size", "n_routed_experts",
                     "n_shared_experts", "num_nextn_predict_layers", "first_k_dense_replace"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, name, "an integer >= 0")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "even (RoPE rotates pairs)")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank >= 1),
             "q_lora_rank", "None (no query compression) or an integer >= 1")
        need(self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"between 0 and num_hidden_layers ({self.num_hidden_layers})")
        if self.first_k_dense_replace > 0:
            need(self.intermediate_size >= 1, "intermediate_size", ">= 1 when there are dense layers")
        if self.n_routed_experts > 0 and self.first_k_dense_replace < self.num_hidden_layers + self.num_nextn_predict_layers:
            need(self.moe_intermediate_size >= 1, "moe_intermediate_size", ">= 1 when there are MoE layers")
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                 f"between 1 and n_routed_experts ({self.n_routed_experts})")
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group",
                 f"a divisor of n_routed_experts ({self.n_routed_experts})")
            need(1 <= self.topk_group <= self.n_group, "topk_group", f"between 1 and n_group ({self.n_group})")
            per_group = self.n_routed_experts // self.n_group
            need(self.topk_group * per_group >= self.num_experts_per_tok, "topk_group",
                 f"large enough that topk_group * experts per group ({per_group}) >= num_experts_per_tok "
                 f"({self.num_experts_per_tok})")
            if self.n_group > 1 and self.uses_bias_routing:
                need(per_group >= 2, "n_group", "such that each group holds >= 2 experts (group score = top-2 sum)")
        need(self.scoring_func in ("sigmoid", "softmax"), "scoring_func", "'sigmoid' or 'softmax'")
        need(self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"), "topk_method",
             "'noaux_tc', 'greedy' or 'group_limited_greedy'")
        need(isinstance(self.routed_scaling_factor, (int, float)) and self.routed_scaling_factor > 0,
             "routed_scaling_factor", "a number > 0")
        need(isinstance(self.rms_norm_eps, (int, float)) and 0 < self.rms_norm_eps < 1, "rms_norm_eps",
             "a number in (0, 1)")
        need(isinstance(self.rope_theta, (int, float)) and self.rope_theta > 1, "rope_theta", "a number > 1")
        need(isinstance(self.initializer_range, (int, float)) and self.initializer_range > 0,
             "initializer_range", "a number > 0")
        for name in ("norm_topk_prob", "tie_word_embeddings"):
            need(isinstance(getattr(self, name), bool), name, "true or false")
        need(self.quantization_config is None or isinstance(self.quantization_config, dict), "quantization_config",
             "None or a dict")
        if self.quantization_config is not None and self.quantization_config.get("quant_method") == "fp8":
            need(list(self.quantization_config.get("weight_block_size", [128, 128])) == [128, 128],
                 "quantization_config", "fp8 with weight_block_size [128, 128] (the official block size)")
        need(self.rope_scaling is None or isinstance(self.rope_scaling, dict), "rope_scaling",
             "None or a dict with type 'yarn'")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            kind = rs.get("type", rs.get("rope_type"))
            need(kind in ("yarn", "default", None), "rope_scaling", "None or a dict with type 'yarn'")
            if kind == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    if key not in rs:
                        raise ConfigError(f"rope_scaling: yarn needs the key {key!r}, got {rs!r}")

                def number(key: str, default: float | None = None) -> float:
                    v = rs.get(key, default)
                    v = default if v is None else v
                    need(isinstance(v, (int, float)) and not isinstance(v, bool), "rope_scaling",
                         f"a dict whose {key!r} is a number")
                    return float(v)

                need(number("factor") >= 1, "rope_scaling", "a yarn factor >= 1")
                need(number("original_max_position_embeddings") >= 1, "rope_scaling",
                     "a yarn original_max_position_embeddings >= 1")
                need(number("beta_fast", 32) > number("beta_slow", 1) > 0, "rope_scaling",
                     "yarn beta_fast > beta_slow > 0")

    # ----------------------------------------------------------------------------------------------
    # config.json
    _HF_FIELDS = (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "first_k_dense_replace", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
        "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
        "n_group", "topk_group", "routed_scaling_factor", "scoring_func", "topk_method", "norm_topk_prob",
        "rms_norm_eps", "rope_theta", "max_position_embeddings", "rope_scaling", "num_nextn_predict_layers",
        "initializer_range", "tie_word_embeddings", "bos_token_id", "eos_token_id", "quantization_config",
    )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a config dict in any form dsv3 knows: the Hugging Face one (:meth:`from_hf_dict`) or
        DeepSeek's reference-inference one (``dim``, ``n_layers``, ...: :mod:`dsv3.config_formats`)."""
        if config_formats.is_reference_form(d):
            hf, unknown = config_formats.reference_to_hf(d)
            if unknown:
                warnings.warn(f"config: keys DeepSeek's reference code does not read, ignored: {unknown}",
                              ConfigWarning, stacklevel=2)
            return cls.from_hf_dict(hf)
        return cls.from_hf_dict(d)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from the dict of a Hugging Face ``config.json`` (official DeepSeek-V3/V2 or transformers 4/5).

        A key the file lacks takes the default of its model type's transformers config class
        (:data:`dsv3.config_formats.ABSENT_DEFAULTS`): ``deepseek_v3`` routes with sigmoid scores, the
        correction bias and group-limited top-k, ``deepseek_v2`` with softmax and greedy top-k. Keys dsv3 does
        not read are kept (and written back) with a warning; values asking for a model dsv3 does not implement
        (another activation, biased projections, ...) are a :class:`ConfigError`.
        """
        if config_formats.is_reference_form(d):
            raise ConfigError("config: this is DeepSeek's reference-inference form (dim, n_layers, ...), not a "
                              "Hugging Face config.json: read it with ModelConfig.from_dict or from_json")
        d = copy.deepcopy(d)
        key_order = tuple(d)
        try:
            config_formats.check_fixed_keys(d)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        family = config_formats.model_family(d)
        if family is None:
            family = config_formats.V2 if d.get("scoring_func") == "softmax" else config_formats.V3
            warnings.warn(f"config: no model_type or architectures naming DeepSeek-V3 or V2; keys it lacks take "
                          f"{family}'s defaults", ConfigWarning, stacklevel=2)
        unknown = config_formats.unknown_keys(d, cls._HF_FIELDS)
        if unknown:
            warnings.warn(f"config: keys dsv3 does not read (kept in the file, no effect on the model): {unknown}",
                          ConfigWarning, stacklevel=2)
        kwargs: dict[str, Any] = {}
        rope_params = d.get("rope_parameters")
        if rope_params is not None and "rope_scaling" not in d:
            # transformers 5 folds rope_theta and rope_scaling into one rope_parameters dict (it stays in
            # ``extra``, and to_hf_dict writes that form back)
            if not isinstance(rope_params, dict):
                raise ConfigError(f"rope_parameters: must be a dict, got {rope_params!r}")
            rp = dict(rope_params)
            if "rope_theta" in rp:
                kwargs["rope_theta"] = rp.pop("rope_theta")
            kind = rp.pop("rope_type", None)
            kind = rp.pop("type", None) or kind or "default"  # transformers 5 may write both keys
            kwargs["rope_scaling"] = None if kind == "default" else {"type": kind, **rp}
        for name in cls._HF_FIELDS:
            if name in d and name not in kwargs:
                kwargs[name] = d.pop(name)
        # absent from the file: the model type's default; absent means none for these (and no MTP module)
        defaults = {**config_formats.ABSENT_DEFAULTS[family], "rope_scaling": None, "quantization_config": None,
                    "bos_token_id": None, "eos_token_id": None, "num_nextn_predict_layers": 0}
        for name, value in defaults.items():
            kwargs.setdefault(name, copy.deepcopy(value))
        if kwargs["n_routed_experts"] is None:
            kwargs["n_routed_experts"] = 0
        for name in ("n_group", "topk_group"):  # null: no group restriction
            if kwargs[name] is None:
                kwargs[name] = 1
        kwargs["absent"] = {n: copy.deepcopy(kwargs[n]) for n in cls._HF_FIELDS if n not in key_order}
        kwargs["extra"] = d
        kwargs["key_order"] = key_order
        try:
            return cls(**kwargs)
        except TypeError as e:  # a field of the wrong kind
            raise ConfigError(str(e)) from e

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict. Keys read from a file come back in the same form (exact round trip);
        a config built in Python gets the official DeepSeek-V3 layout, which transformers loads."""
        d: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "num_key_value_heads": self.num_attention_heads,
            "moe_layer_freq": 1,
            "torch_dtype": "bfloat16",
        } if not self.extra else {}
        d.update(copy.deepcopy(self.extra))
        # the file used transformers 5's form (rope_parameters, no rope_scaling): write that form back
        rope_parameters_form = isinstance(self.extra.get("rope_parameters"), dict) and "rope_scaling" in self.absent
        for name in self._HF_FIELDS:
            value = copy.deepcopy(getattr(self, name))
            if name == "quantization_config" and value is None:
                continue
            if name in self.absent and (value == self.absent[name] or (
                    rope_parameters_form and name in ("rope_scaling", "rope_theta"))):
                continue  # not in the file read and not changed since (or folded into rope_parameters)
            d[name] = value
        if rope_parameters_form:
            original = self.extra["rope_parameters"]
            rs = copy.deepcopy(self.rope_scaling) or {}
            kind = rs.pop("type", None) or rs.pop("rope_type", None) or "default"
            rs.pop("rope_type", None)
            new: dict[str, Any] = {}
            if "rope_theta" in original or "rope_theta" in self.absent:
                new["rope_theta"] = self.rope_theta
            if "rope_type" in original or "type" not in original:
                new["rope_type"] = kind
            if "type" in original:
                new["type"] = kind
            new.update(rs)
            rp = {k: new[k] for k in original if k in new}  # the file's key order, then any new key
            rp.update({k: v for k, v in new.items() if k not in rp})
            d["rope_parameters"] = rp
        if self.key_order:  # keys in the order of the file read
            d = {**{k: d[k] for k in self.key_order if k in d}, **{k: v for k, v in d.items() if k not in self.key_order}}
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_json(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2)
            f.write("\n")

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature factor sqrt(t) = 0.1 * mscale * ln(s) + 1 (§4.3); 1 when s <= 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# ------------------------------------------------------------------------------------------------------
# presets

def _v3_671b() -> ModelConfig:
    return ModelConfig(quantization_config=None)


def _16b() -> ModelConfig:
    """DeepSeek-V2-Lite shapes with V3's sigmoid routing: the GPU benchmark shape of the project."""
    return ModelConfig(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        num_nextn_predict_layers=1, bos_token_id=100000, eos_token_id=100001,
    )


def _tiny() -> ModelConfig:
    """CPU-sized, every feature on: query + KV compression, 4 expert groups with 2 kept, a shared expert,
    a dense first layer, MTP depth 1."""
    return ModelConfig(
        vocab_size=4096, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=96,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, max_position_embeddings=1024, rope_scaling=None,
        num_nextn_predict_layers=1, initializer_range=0.02, bos_token_id=0, eos_token_id=1,
    )


PRESETS = {"v3-671b": _v3_671b, "16b": _16b, "tiny": _tiny}


def preset(name: str) -> ModelConfig:
    """A named configuration: ``v3-671b`` (the report's model), ``16b`` (benchmark shape) or ``tiny`` (CPU)."""
    if name not in PRESETS:
        raise ConfigError(f"preset: must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]()

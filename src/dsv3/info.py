"""Sizes of a configuration, counted on the meta device (no memory, seconds even for 671B).

Activated parameters per token: everything except the routed experts a token does not use (the embedding
row lookup counted as one row would be negligible; the whole table is counted, as the report does).
Forward FLOPs per token: 2 x activated matmul parameters (embedding excluded, output head included) plus
causal attention, 2 x layers x heads x seq x (d_h + d_h^R + d_v) / 2 at context length ``seq``; training is
3x that. KV cache per token: MLA's latent c^KV + k^R per layer, against a plain multi-head cache of every
head's key (d_h + d_h^R) and value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .model import DeepSeekV3
from .model.moe import Experts


@dataclass
class ModelStats:
    total_params: int
    """Main model (MTP modules excluded)."""
    mtp_params: int
    """The MTP modules' own parameters (embedding and head are shared with the main model)."""
    activated_params: int
    """Main-model parameters used per token."""
    activated_matmul_params: int
    """Of these, the ones in matrix multiplications (embedding excluded, head included)."""
    embedding_params: int
    forward_flops_per_token: float
    seq_len: int
    kv_cache_bytes_mla: int
    kv_cache_bytes_mha: int


def model_stats(config: ModelConfig, seq_len: int = 4096, cache_dtype_bytes: int = 2) -> ModelStats:
    with torch.device("meta"):
        model = DeepSeekV3(config)
    main = {n: p for n, p in model.named_parameters() if not n.startswith("mtp.")}
    total = sum(p.numel() for p in main.values())
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    unused_experts = 0
    for name, module in model.named_modules():
        if isinstance(module, Experts) and not name.startswith("mtp."):
            per_expert = (module.gate_up_proj.numel() + module.down_proj.numel()) // module.n_experts
            unused_experts += per_expert * (module.n_experts - config.num_experts_per_tok)
    activated = total - unused_experts
    embedding = model.embed_tokens.weight.numel()
    norms = sum(p.numel() for n, p in main.items() if p.dim() == 1)
    matmul = activated - embedding - norms
    attn = 2 * config.num_hidden_layers * config.num_attention_heads * seq_len * (
        config.qk_head_dim + config.v_head_dim) / 2
    layers = config.num_hidden_layers
    return ModelStats(
        total_params=total, mtp_params=mtp, activated_params=activated, activated_matmul_params=matmul,
        embedding_params=embedding, forward_flops_per_token=2 * matmul + attn, seq_len=seq_len,
        kv_cache_bytes_mla=layers * (config.kv_lora_rank + config.qk_rope_head_dim) * cache_dtype_bytes,
        kv_cache_bytes_mha=layers * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
        * cache_dtype_bytes,
    )


def _human(n: float, digits: int = 1) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.{digits}f}{unit}"
    return f"{n:.0f}"


def format_stats(config: ModelConfig, s: ModelStats, name: str = "") -> str:
    moe = f"{config.n_routed_experts} routed (top-{config.num_experts_per_tok}"
    if config.n_group > 1:
        moe += f", {config.n_group} groups / {config.topk_group} kept"
    moe += f") + {config.n_shared_experts} shared, {config.scoring_func}"
    rows = [
        ("model", name or "custom config"),
        ("layers", f"{config.num_hidden_layers} ({config.first_k_dense_replace} dense, {config.n_moe_layers} MoE)"
                   f" + {config.num_nextn_predict_layers} MTP"),
        ("hidden / heads", f"{config.hidden_size} / {config.num_attention_heads}"),
        ("MLA ranks", f"q {config.q_lora_rank or 'none'}, kv {config.kv_lora_rank}, "
                      f"head {config.qk_nope_head_dim}+{config.qk_rope_head_dim} (v {config.v_head_dim})"),
        ("experts", moe),
        ("parameters (main model)", f"{s.total_params:,} ({_human(s.total_params)})"),
        ("activated per token", f"{s.activated_params:,} ({_human(s.activated_params, 2)}; in matmuls "
                                f"{_human(s.activated_matmul_params, 2)})"),
        ("MTP modules", f"{s.mtp_params:,} ({_human(s.mtp_params)}; + embedding and head copies in the "
                        f"checkpoint: {_human(s.mtp_params + 2 * s.embedding_params * min(1, config.num_nextn_predict_layers))})"),
        (f"forward FLOPs/token @ {s.seq_len}", f"{s.forward_flops_per_token:.4g} ({_human(s.forward_flops_per_token)}; "
                                              f"training 3x = {_human(3 * s.forward_flops_per_token)})"),
        ("KV cache/token (bf16)", f"MLA latent {s.kv_cache_bytes_mla:,} B vs multi-head {s.kv_cache_bytes_mha:,} B "
                                  f"({s.kv_cache_bytes_mha / s.kv_cache_bytes_mla:.1f}x smaller)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

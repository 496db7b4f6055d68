"""The config.json forms a DeepSeek-V3 model comes in, and what each means where a key is absent.

:class:`dsv3.ModelConfig` reads the Hugging Face form (field names of the official ``config.json``). Three
writers produce it, and they leave different keys out:

* the official DeepSeek-V3 release writes every field, routing included (``scoring_func``, ``topk_method``);
* transformers 5 (``DeepseekV3Config.save_pretrained``) writes no ``scoring_func`` / ``topk_method`` (its V3
  model always routes with sigmoid scores, the correction bias and group-limited top-k) and folds
  ``rope_theta`` / ``rope_scaling`` into ``rope_parameters``;
* DeepSeek-V2 files (``model_type: deepseek_v2``) mean softmax scores and greedy top-k without a bias.

So an absent key takes the default of the *model type's* transformers config class, as transformers itself
reads the file (:data:`ABSENT_DEFAULTS`; a test checks the table against the installed transformers).

DeepSeek's own reference-inference code (``inference/model.py`` of the DeepSeek-V3 repository) has a fourth,
shorter form (``dim``, ``n_layers``, ``score_func`` ...; ``inference/configs/config_671B.json``);
:func:`reference_to_hf` translates it, reading each key as that code does.

This module is plain data and functions on dicts; it imports nothing from dsv3.
"""

from __future__ import annotations

import copy
import math
from typing import Any

V3, V2 = "deepseek_v3", "deepseek_v2"

# Defaults of transformers' DeepseekV3Config / DeepseekV2Config for the fields that shape the model, plus the
# routing each model class implements without a config key (V3: sigmoid + bias + group-limited top-k).
# Not here, on purpose: ``bos_token_id`` / ``eos_token_id`` / ``quantization_config`` / ``rope_scaling``
# (absent means none) and ``num_nextn_predict_layers`` (absent means no MTP module: files that predate the
# key, e.g. transformers 4's, were written by models without one).
ABSENT_DEFAULTS: dict[str, dict[str, Any]] = {
    V3: {
        "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 61, "first_k_dense_replace": 3, "num_attention_heads": 128, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "initializer_range": 0.02, "tie_word_embeddings": False,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    },
    V2: {
        "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "moe_intermediate_size": 1407,
        "num_hidden_layers": 32, "first_k_dense_replace": 0, "num_attention_heads": 32, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": None, "n_group": None,
        "topk_group": None, "routed_scaling_factor": 1.0, "norm_topk_prob": False, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 2048, "initializer_range": 0.02,
        "tie_word_embeddings": False, "scoring_func": "softmax", "topk_method": "greedy",
    },
}

# Keys that do not shape the model (bookkeeping of transformers and of the official files): kept verbatim.
PASSIVE_KEYS = frozenset({
    "architectures", "model_type", "auto_map", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "pretraining_tp", "aux_loss_alpha", "seq_aux", "ep_size", "attention_dropout", "output_router_logits",
    "pad_token_id", "qk_head_dim", "head_dim", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type", "_name_or_path",
    "torchscript", "tie_encoder_decoder", "tokenizer_class", "prefix", "task_specific_params",
    "rope_parameters",  # read in place of rope_theta / rope_scaling
    "num_key_value_heads",  # MLA derives keys and values per head from the latent: the weights fix the count
})

# Keys that would change the model if they held another value: the values dsv3 implements.
FIXED_KEYS: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "moe_layer_freq": (1,),
    "rope_interleave": (True, None),  # the official weights pair RoPE dimensions interleaved
}


def model_family(d: dict[str, Any]) -> str | None:
    """``deepseek_v3`` or ``deepseek_v2`` from ``model_type`` or ``architectures``; None when neither says."""
    kind = d.get("model_type")
    if kind in (V3, V2):
        return kind
    arch = " ".join(a for a in d.get("architectures") or [] if isinstance(a, str))
    if "DeepseekV3" in arch:
        return V3
    if "DeepseekV2" in arch:
        return V2
    return None


def check_fixed_keys(d: dict[str, Any]) -> None:
    """Raise ValueError naming each key whose value asks for a model dsv3 does not implement."""
    bad = [f"{k}={d[k]!r} (dsv3 implements {' or '.join(repr(v) for v in allowed)})"
           for k, allowed in FIXED_KEYS.items() if k in d and d[k] not in allowed]
    if bad:
        raise ValueError("config.json asks for a model dsv3 does not implement: " + "; ".join(bad))


def unknown_keys(d: dict[str, Any], fields: tuple[str, ...]) -> list[str]:
    """Keys of a Hugging Face form config that dsv3 neither reads nor knows to be harmless."""
    return sorted(k for k in d if k not in fields and k not in PASSIVE_KEYS and k not in FIXED_KEYS)


# ------------------------------------------------------------------------------------------------------
# DeepSeek's reference-inference form

# reference key -> Hugging Face field, for the keys that map one to one
_REFERENCE_RENAMES = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "inter_dim": "intermediate_size",
    "moe_inter_dim": "moe_intermediate_size", "n_layers": "num_hidden_layers",
    "n_dense_layers": "first_k_dense_replace", "n_heads": "num_attention_heads",
    "n_routed_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok", "n_expert_groups": "n_group", "n_limited_groups": "topk_group",
    "route_scale": "routed_scaling_factor", "kv_lora_rank": "kv_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim", "rope_theta": "rope_theta",
}
# The defaults of the reference code's ModelArgs, which its JSON files override key by key.
REFERENCE_DEFAULTS: dict[str, Any] = {
    "max_batch_size": 8, "max_seq_len": 4096 * 4, "dtype": "bf16", "scale_fmt": None, "vocab_size": 102400,
    "dim": 2048, "inter_dim": 10944, "moe_inter_dim": 1408, "n_layers": 27, "n_dense_layers": 1, "n_heads": 16,
    "n_routed_experts": 64, "n_shared_experts": 2, "n_activated_experts": 6, "n_expert_groups": 1,
    "n_limited_groups": 1, "score_func": "softmax", "route_scale": 1.0, "q_lora_rank": 0, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "original_seq_len": 4096,
    "rope_theta": 10000.0, "rope_factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
}
def is_reference_form(d: dict[str, Any]) -> bool:
    """A dict in the reference code's form (``dim`` and ``n_layers`` instead of ``hidden_size`` ...)."""
    return "hidden_size" not in d and "num_hidden_layers" not in d and ("dim" in d or "n_layers" in d)


def reference_to_hf(d: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Translate a reference-form config to the Hugging Face form; returns (dict, keys it does not know).

    Each value means what the reference ``inference/model.py`` makes of it: the gate has the correction bias
    only when ``dim == 7168`` (otherwise a group's score is its best affinity, as in V2); sigmoid gate values are
    normalised, softmax ones are not; YaRN (``rope_factor``, ``mscale`` for both the frequencies and the
    attention scale) applies when ``max_seq_len`` exceeds ``original_seq_len``; ``dtype: fp8`` means 128x128
    block-scaled FP8 weights. The reference model has no MTP module.
    """
    unknown = sorted(k for k in d if k not in REFERENCE_DEFAULTS)
    a = {**REFERENCE_DEFAULTS, **{k: copy.deepcopy(v) for k, v in d.items() if k in REFERENCE_DEFAULTS}}
    out: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": V3}
    out.update({hf: a[ref] for ref, hf in _REFERENCE_RENAMES.items()})
    out["q_lora_rank"] = a["q_lora_rank"] or None
    sigmoid = a["score_func"] == "sigmoid"
    out["scoring_func"] = a["score_func"]
    out["norm_topk_prob"] = sigmoid
    if a["dim"] == 7168:
        out["topk_method"] = "noaux_tc"
    else:
        out["topk_method"] = "group_limited_greedy" if a["n_expert_groups"] > 1 else "greedy"
    out["rms_norm_eps"] = 1e-6
    out["tie_word_embeddings"] = False
    out["num_nextn_predict_layers"] = 0
    if a["max_seq_len"] > a["original_seq_len"]:
        out["rope_scaling"] = {"type": "yarn", "factor": a["rope_factor"],
                               "original_max_position_embeddings": a["original_seq_len"],
                               "beta_fast": a["beta_fast"], "beta_slow": a["beta_slow"],
                               "mscale": a["mscale"], "mscale_all_dim": a["mscale"]}
        out["max_position_embeddings"] = max(a["max_seq_len"], math.ceil(a["original_seq_len"] * a["rope_factor"]))
    else:
        out["rope_scaling"] = None
        out["max_position_embeddings"] = a["max_seq_len"]
    if a["dtype"] == "fp8":
        qc: dict[str, Any] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                              "weight_block_size": [128, 128]}
        if a["scale_fmt"] is not None:
            qc["scale_fmt"] = a["scale_fmt"]
        out["quantization_config"] = qc
    return out, unknown

import json

import pytest

import dsv3
from dsv3.config import ConfigError, ModelConfig, preset

# config.json of the official DeepSeek-V3 release (auto_map and the like abridged)
OFFICIAL_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}


def test_official_config_round_trip_exact(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_V3, indent=2))
    config = ModelConfig.from_json(tmp_path)
    assert config.num_hidden_layers == 61 and config.n_group == 8 and config.yarn["factor"] == 40
    out = tmp_path / "out"
    out.mkdir()
    config.to_json(out)
    written = json.loads((out / "config.json").read_text())
    assert written == OFFICIAL_V3
    assert json.dumps(written, sort_keys=True) == json.dumps(OFFICIAL_V3, sort_keys=True)  # 10000 stays an int


def test_official_config_is_the_v3_preset():
    official = ModelConfig.from_hf_dict(OFFICIAL_V3)
    ours = preset("v3-671b")
    for name in ModelConfig._HF_FIELDS:
        if name in ("quantization_config", "initializer_range"):
            continue  # the release is FP8 and states transformers' default init; the report says 0.006
        assert getattr(official, name) == getattr(ours, name), name


def test_transformers5_rope_parameters_accepted_and_round_trip():
    d = dict(OFFICIAL_V3)
    del d["rope_scaling"], d["rope_theta"]
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0,
                            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                            "original_max_position_embeddings": 4096}
    config = ModelConfig.from_hf_dict(d)
    assert config.rope_theta == 10000.0 and config.yarn["factor"] == 40.0
    assert config.softmax_scale == pytest.approx(preset("v3-671b").softmax_scale)
    assert config.to_hf_dict() == d


def test_python_config_loads_in_transformers():
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3Config(**preset("tiny").to_hf_dict())
    assert hf.n_routed_experts == 16 and hf.topk_group == 2 and hf.q_lora_rank == 96


@pytest.mark.parametrize("changes, field", [
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"first_k_dense_replace": 62}, "first_k_dense_replace"),
    ({"q_lora_rank": 0}, "q_lora_rank"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
    ({"rope_scaling": {"type": "yarn"}}, "rope_scaling"),
    ({"topk_method": "best"}, "topk_method"),
])
def test_validation_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        preset("v3-671b").replace(**changes)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset"):
        preset("v4")


def test_presets():
    tiny = preset("tiny")
    assert tiny.q_lora_rank and tiny.n_group >= 4 and tiny.topk_group < tiny.n_group
    assert tiny.n_shared_experts >= 1 and tiny.first_k_dense_replace >= 1 and tiny.num_nextn_predict_layers >= 1
    b16 = preset("16b")
    assert (b16.hidden_size, b16.num_hidden_layers, b16.n_routed_experts, b16.num_experts_per_tok,
            b16.n_shared_experts, b16.q_lora_rank, b16.vocab_size) == (2048, 27, 64, 6, 2, None, 102400)
    assert isinstance(dsv3.build_model("tiny"), dsv3.DeepSeekV3)


# config.json of DeepSeek-V2-Lite (softmax routing, no MTP, no query compression; auto_map abridged)
V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}


def test_deepseek_v2_config_reads_and_round_trips():
    config = ModelConfig.from_hf_dict(V2_LITE)
    assert config.scoring_func == "softmax" and not config.uses_bias_routing
    assert config.num_nextn_predict_layers == 0 and config.q_lora_rank is None and not config.norm_topk_prob
    assert config.to_hf_dict() == V2_LITE
    gate = dsv3.model.Gate(config)
    assert gate.e_score_correction_bias is None

import copy
import json
import re
import warnings

import pytest

import dsv3
from dsv3.config import ConfigError, ConfigWarning, ModelConfig, preset

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
    text = json.dumps(OFFICIAL_V3, indent=2) + "\n"
    (tmp_path / "config.json").write_text(text)
    config = ModelConfig.from_json(tmp_path)
    assert config.num_hidden_layers == 61 and config.n_group == 8 and config.yarn["factor"] == 40
    assert config.quantization_config["weight_block_size"] == [128, 128]
    out = tmp_path / "out"
    out.mkdir()
    config.to_json(out)
    written = (out / "config.json").read_text()
    assert json.loads(written) == OFFICIAL_V3
    assert written == text  # same keys in the same order, 10000 stays an int, 1e-06 stays 1e-06


def test_transformers5_saved_config_reads_as_official_and_round_trips(tmp_path):
    """transformers 5 rewrites the official file with rope_parameters (holding both rope_type and type)."""
    transformers = pytest.importorskip("transformers")
    transformers.DeepseekV3Config(**copy.deepcopy(OFFICIAL_V3)).save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert "rope_parameters" in json.loads(text) and "rope_scaling" not in json.loads(text)
    config = ModelConfig.from_json(tmp_path)
    official = ModelConfig.from_hf_dict(OFFICIAL_V3)
    for name in ModelConfig._HF_FIELDS:
        assert getattr(config, name) == getattr(official, name), name
    assert config.to_hf_dict() == json.loads(text)
    out = tmp_path / "out"
    out.mkdir()
    config.to_json(out)
    assert (out / "config.json").read_text().rstrip() == text.rstrip()
    # a changed value lands in rope_parameters, never in a second rope_scaling key
    changed = config.replace(rope_theta=50000.0, rope_scaling={**config.rope_scaling, "factor": 8}).to_hf_dict()
    assert "rope_scaling" not in changed and "rope_theta" not in changed
    assert changed["rope_parameters"]["rope_theta"] == 50000.0 and changed["rope_parameters"]["factor"] == 8


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


@pytest.mark.parametrize("changes, field, allowed", [
    ({"n_group": 3}, "n_group", "a divisor of n_routed_experts (256)"),
    ({"topk_group": 9}, "topk_group", "between 1 and n_group (8)"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok", "between 1 and n_routed_experts (256)"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok", "between 1 and n_routed_experts (256)"),
    ({"scoring_func": "relu"}, "scoring_func", "'sigmoid' or 'softmax'"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim", "even"),
    ({"hidden_size": 0}, "hidden_size", "an integer >= 1"),
    ({"vocab_size": 1.5}, "vocab_size", "an integer >= 1"),
    ({"n_shared_experts": -1}, "n_shared_experts", "an integer >= 0"),
    ({"first_k_dense_replace": 62}, "first_k_dense_replace", "between 0 and num_hidden_layers (61)"),
    ({"q_lora_rank": 0}, "q_lora_rank", "None (no query compression) or an integer >= 1"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps", "a number in (0, 1)"),
    ({"routed_scaling_factor": 0}, "routed_scaling_factor", "a number > 0"),
    ({"rope_scaling": {"type": "yarn"}}, "rope_scaling", "yarn needs the key 'factor'"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling", "None or a dict with type 'yarn'"),
    ({"rope_scaling": "yarn"}, "rope_scaling", "None or a dict with type 'yarn'"),
    ({"rope_scaling": {"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 4096}}, "rope_scaling",
     "a yarn factor >= 1"),
    ({"rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 1,
                       "beta_slow": 32}}, "rope_scaling", "yarn beta_fast > beta_slow > 0"),
    ({"topk_method": "best"}, "topk_method", "'noaux_tc', 'greedy' or 'group_limited_greedy'"),
    ({"norm_topk_prob": "yes"}, "norm_topk_prob", "true or false"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}, "quantization_config",
     "weight_block_size [128, 128]"),
])
def test_validation_names_the_field_and_range(changes, field, allowed):
    with pytest.raises(ConfigError, match=rf"^{field}: .*{re.escape(allowed)}") as e:
        preset("v3-671b").replace(**changes)
    assert "got" in str(e.value)  # and the offending value


def test_config_json_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^n_group: must be a divisor of n_routed_experts \(256\), got 5"):
        ModelConfig.from_hf_dict({**OFFICIAL_V3, "n_group": 5})
    with pytest.raises(ConfigError, match=r"^rope_parameters: must be a dict"):
        ModelConfig.from_hf_dict({k: v for k, v in OFFICIAL_V3.items() if k != "rope_scaling"} | {"rope_parameters": 3})


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset"):
        preset("v4")


def test_presets():
    v3 = preset("v3-671b")  # the report's model (§4.2), number by number
    assert (v3.num_hidden_layers, v3.hidden_size, v3.first_k_dense_replace, v3.num_attention_heads, v3.q_lora_rank,
            v3.kv_lora_rank, v3.n_routed_experts, v3.n_shared_experts, v3.num_experts_per_tok, v3.n_group,
            v3.topk_group, v3.routed_scaling_factor, v3.scoring_func, v3.vocab_size, v3.num_nextn_predict_layers,
            v3.moe_intermediate_size, v3.intermediate_size, v3.qk_nope_head_dim, v3.qk_rope_head_dim, v3.v_head_dim
            ) == (61, 7168, 3, 128, 1536, 512, 256, 1, 8, 8, 4, 2.5, "sigmoid", 129280, 1, 2048, 18432, 128, 64, 128)
    assert v3.uses_bias_routing and v3.norm_topk_prob and not v3.tie_word_embeddings
    assert v3.yarn["factor"] == 40 and v3.yarn["original_max_position_embeddings"] == 4096
    assert (v3.yarn["beta_fast"], v3.yarn["beta_slow"]) == (32, 1) and v3.initializer_range == 0.006

    tiny = preset("tiny")  # every feature on
    assert tiny.q_lora_rank and tiny.q_lora_rank < tiny.hidden_size  # query compression
    assert tiny.kv_lora_rank < tiny.num_attention_heads * (tiny.qk_nope_head_dim + tiny.v_head_dim)  # KV compression
    assert tiny.n_group >= 4 and tiny.topk_group < tiny.n_group and tiny.uses_bias_routing  # group-limited
    assert tiny.n_shared_experts >= 1 and tiny.first_k_dense_replace >= 1 and tiny.num_nextn_predict_layers >= 1
    assert tiny.n_moe_layers >= 1 and tiny.scoring_func == "sigmoid"

    b16 = preset("16b")  # shared/benchmarks.md
    assert (b16.hidden_size, b16.num_hidden_layers, b16.first_k_dense_replace, b16.intermediate_size,
            b16.num_attention_heads, b16.q_lora_rank, b16.kv_lora_rank, b16.qk_nope_head_dim, b16.qk_rope_head_dim,
            b16.v_head_dim, b16.n_routed_experts, b16.num_experts_per_tok, b16.n_group, b16.n_shared_experts,
            b16.moe_intermediate_size, b16.routed_scaling_factor, b16.vocab_size, b16.tie_word_embeddings,
            b16.scoring_func) == (2048, 27, 1, 10944, 16, None, 512, 128, 64, 128, 64, 6, 1, 2, 1408, 1.0, 102400,
                                  False, "sigmoid")
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


def test_field_absent_from_the_file_is_written_once_changed():
    config = ModelConfig.from_hf_dict(V2_LITE)  # no num_nextn_predict_layers, no quantization_config
    assert "num_nextn_predict_layers" not in config.to_hf_dict()
    with_mtp = config.replace(num_nextn_predict_layers=1)
    assert with_mtp.to_hf_dict()["num_nextn_predict_layers"] == 1
    assert ModelConfig.from_hf_dict(with_mtp.to_hf_dict()).num_nextn_predict_layers == 1


# ---------------------------------------------------------------------------------------------- other forms
def test_absent_keys_take_the_defaults_of_transformers_config_classes():
    """A key the file lacks means what transformers' class for the model type says it means."""
    transformers = pytest.importorskip("transformers")
    from dsv3.config_formats import ABSENT_DEFAULTS

    for family, cls in (("deepseek_v3", transformers.DeepseekV3Config), ("deepseek_v2", transformers.DeepseekV2Config)):
        theirs = cls().to_dict()
        theirs["rope_theta"] = theirs["rope_parameters"]["rope_theta"]
        for name, value in ABSENT_DEFAULTS[family].items():
            if name in ("scoring_func", "topk_method") and name not in theirs:
                continue  # the routing transformers' model class implements without a key (parity tests)
            assert theirs[name] == value, (family, name)


def test_transformers_written_configs_read_without_warnings_as_their_model_type(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.DeepseekV3Config(n_group=4, topk_group=2, n_routed_experts=16).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "topk_method" not in written and "scoring_func" not in written  # transformers 5 leaves them out
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        v3 = ModelConfig.from_json(tmp_path)
        assert (v3.scoring_func, v3.topk_method, v3.norm_topk_prob, v3.n_group) == ("sigmoid", "noaux_tc", True, 4)
        assert v3.to_hf_dict() == written  # nothing added on the way back
        transformers.DeepseekV2Config(num_experts_per_tok=6).save_pretrained(tmp_path)
        v2 = ModelConfig.from_json(tmp_path)
    assert (v2.scoring_func, v2.topk_method, v2.norm_topk_prob, v2.n_group, v2.topk_group) == (
        "softmax", "greedy", False, 1, 1)
    # the official files and DeepSeek-V2-Lite read without warnings too
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        ModelConfig.from_hf_dict(OFFICIAL_V3), ModelConfig.from_hf_dict(V2_LITE)


def test_model_type_decides_the_routing_of_a_file_without_routing_keys():
    bare = {k: v for k, v in OFFICIAL_V3.items() if k not in ("scoring_func", "topk_method")}
    assert ModelConfig.from_hf_dict(bare).uses_bias_routing
    assert ModelConfig.from_hf_dict({**bare, "model_type": "x", "architectures": ["DeepseekV3ForCausalLM"]}).scoring_func == "sigmoid"
    v2 = {k: v for k, v in V2_LITE.items() if k not in ("scoring_func", "topk_method", "norm_topk_prob")}
    config = ModelConfig.from_hf_dict(v2)
    assert (config.scoring_func, config.topk_method, config.norm_topk_prob) == ("softmax", "greedy", False)
    with pytest.warns(ConfigWarning, match="no model_type"):
        ModelConfig.from_hf_dict({k: v for k, v in bare.items() if k not in ("model_type", "architectures")})


def test_unknown_keys_warn_and_unimplemented_values_are_errors():
    with pytest.warns(ConfigWarning, match=r"\['index_topk'\]"):
        config = ModelConfig.from_hf_dict({**OFFICIAL_V3, "index_topk": 2048})
    assert config.to_hf_dict()["index_topk"] == 2048  # kept for the round trip
    for key, value in (("hidden_act", "gelu"), ("rope_interleave", False), ("attention_bias", True),
                       ("moe_layer_freq", 2)):
        with pytest.raises(ConfigError, match=rf"{key}={value!r}"):
            ModelConfig.from_hf_dict({**OFFICIAL_V3, key: value})


# inference/configs/config_671B.json of the DeepSeek-V3 repository (DeepSeek's reference-inference form)
REFERENCE_671B = {
    "vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
    "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1, "n_activated_experts": 8,
    "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5, "score_func": "sigmoid", "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8",
}


def test_deepseek_reference_form_reads_as_the_official_model(tmp_path):
    (tmp_path / "config_671B.json").write_text(json.dumps(REFERENCE_671B))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        ref = ModelConfig.from_json(tmp_path / "config_671B.json")
    official = ModelConfig.from_hf_dict(OFFICIAL_V3)
    for name in ModelConfig._HF_FIELDS:
        if name in ("initializer_range", "bos_token_id", "eos_token_id"):
            continue  # not in the reference form
        if name == "num_nextn_predict_layers":
            assert ref.num_nextn_predict_layers == 0  # the reference model has no MTP module
            continue
        assert getattr(ref, name) == getattr(official, name), name
    # the reference code's defaults: the 16B shape with softmax routing, no bias, plain top-k
    small = ModelConfig.from_dict({"dim": 2048, "max_seq_len": 4096})
    assert (small.num_hidden_layers, small.scoring_func, small.uses_bias_routing, small.norm_topk_prob,
            small.rope_scaling, small.q_lora_rank) == (27, "softmax", False, False, None, None)
    with pytest.warns(ConfigWarning, match=r"\['moe_ep_size'\]"):
        ModelConfig.from_dict({**REFERENCE_671B, "moe_ep_size": 16})
    with pytest.raises(ConfigError, match="reference-inference form"):
        ModelConfig.from_hf_dict(REFERENCE_671B)


def test_info_reads_the_reference_form(tmp_path):
    from conftest import run_cli

    (tmp_path / "config_671B.json").write_text(json.dumps(REFERENCE_671B))
    out = run_cli("info", "--config", str(tmp_path / "config_671B.json"))
    assert out.returncode == 0, out.stderr
    official = run_cli("info", "--preset", "v3-671b").stdout
    # the main model is the 671B model (the reference form has no MTP module); the old reader printed the
    # preset's numbers with softmax routing for any such file
    lines = lambda text: {ln.split("  ")[0]: ln for ln in text.splitlines()}  # noqa: E731
    ours, theirs = lines(out.stdout), lines(official)
    for key in ("parameters (main model)", "activated per token", "experts", "MLA ranks", "hidden / heads"):
        assert ours[key] == theirs[key], key
    assert "sigmoid" in ours["experts"] and "+ 1 MTP" not in ours["layers"]
    small = tmp_path / "small.json"
    small.write_text(json.dumps({**REFERENCE_671B, "dim": 1024, "n_layers": 4, "n_dense_layers": 1}))
    out = run_cli("info", "--config", str(small))
    assert out.returncode == 0 and "1024 / 128" in out.stdout and "layers                      4 (1 dense" in out.stdout

"""Logits parity with transformers' DeepseekV3ForCausalLM, both directions, on random weights (float32)."""

import json
import warnings

import pytest
import torch

import dsv3
from dsv3 import ModelConfig

transformers = pytest.importorskip("transformers")


def small_config(**changes) -> ModelConfig:
    base = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, max_position_embeddings=256,
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 16, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        num_nextn_predict_layers=1, initializer_range=0.1,
    )
    base.update(changes)
    return ModelConfig(**base)


def randomise_bias(model: dsv3.DeepSeekV3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, dsv3.model.Gate) and module.e_score_correction_bias is not None:
            module.e_score_correction_bias.copy_(torch.randn(module.n_experts, generator=g) * 0.3)


CASES = {
    "q_lora+yarn": {},
    "no_q_lora": {"q_lora_rank": None},
    "no_yarn": {"rope_scaling": None},
    "yarn_mscale": {"rope_scaling": {"type": "yarn", "factor": 8, "original_max_position_embeddings": 8,
                                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}},
}


@pytest.mark.parametrize("case", list(CASES))
def test_ours_to_transformers(tmp_path, case):
    config = small_config(**CASES[case])
    ours = dsv3.build_model(config, seed=1)
    randomise_bias(ours)
    dsv3.save_pretrained(ours, tmp_path, max_shard_size=200_000)  # sharded, with an index
    assert len(set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    theirs.eval()
    # longer than the original context (16) so YaRN's interpolated frequencies matter; batch > 1
    tokens = torch.randint(0, config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = ours(tokens).logits
        b = theirs(tokens).logits
    assert (a - b).abs().max().item() <= 1e-4
    # the comparison sees the bias and the group limit: without either, the routing and so the logits differ
    gates = [g for g in ours.modules() if isinstance(g, dsv3.model.Gate)]
    with torch.no_grad():
        for g in gates:
            g.topk_groups = g.n_groups
        assert (ours(tokens).logits - b).abs().max().item() > 1e-3
        for g in gates:
            g.topk_groups = config.topk_group
            g.e_score_correction_bias.zero_()
        assert (ours(tokens).logits - b).abs().max().item() > 1e-3


def transformers_native_config(q_lora_rank):
    """The small model built the way a transformers user does: DeepseekV3Config's own arguments only (no
    scoring_func / topk_method, which transformers 5 neither takes nor writes; rope_parameters, not
    rope_scaling)."""
    return transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        max_position_embeddings=256, initializer_range=0.1,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
    )


@pytest.mark.parametrize("source", ["transformers_args", "dsv3_dict"])
@pytest.mark.parametrize("q_lora_rank", [48, None])
def test_transformers_to_ours(tmp_path, q_lora_rank, source):
    if source == "transformers_args":
        hf_config = transformers_native_config(q_lora_rank)
    else:
        hf_config = transformers.DeepseekV3Config(**small_config(q_lora_rank=q_lora_rank).to_hf_dict())
    torch.manual_seed(3)
    theirs = transformers.DeepseekV3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, buf in theirs.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.3)
        for name, p in theirs.named_parameters():  # transformers' init leaves norms at 1: vary them too
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = dsv3.load_pretrained(tmp_path, dtype=torch.float32)
    assert not [w for w in caught if issubclass(w.category, dsv3.config.ConfigWarning)]
    assert ours.config.scoring_func == "sigmoid" and ours.config.uses_bias_routing and ours.config.n_group == 4
    assert len(ours.mtp) == 0, "transformers drops the MTP layer when saving"
    assert any("MTP" in str(w.message) for w in caught)
    tokens = torch.randint(0, hf_config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = ours(tokens).logits
        b = theirs(tokens).logits
    assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("routing", [{}, {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}])
def test_deepseek_v2_softmax_routing_matches_transformers(tmp_path, routing):
    """Softmax scoring without bias (DeepSeek-V2 checkpoints) against transformers' DeepseekV2ForCausalLM."""
    from test_config import V2_LITE

    d = {**V2_LITE, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
         "num_hidden_layers": 3, "num_attention_heads": 4, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
         "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "num_experts_per_tok": 2,
         "vocab_size": 256, "max_position_embeddings": 256, "initializer_range": 0.1,
         "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 0.707, "mscale_all_dim": 0.707,
                          "original_max_position_embeddings": 16, "type": "yarn"}, **routing}
    ours = dsv3.build_model(ModelConfig.from_hf_dict(d), seed=0)
    dsv3.save_pretrained(ours, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "DeepseekV2ForCausalLM"
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(tokens).logits - theirs(tokens).logits).abs().max().item() <= 1e-4

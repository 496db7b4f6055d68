"""Initialisation (report §4.2) that does not depend on what else was built: per-tensor generators seeded by
name, so a model built on the meta device and materialised (as a sharded run does), a rank's slice of the experts,
or a pipeline rank's stages (tests/test_pipeline_schedule.py) get the one-process values."""

from __future__ import annotations

import torch

import dsv3
from dsv3.model import Experts
from dsv3.model.init import init_weights, materialize
from dsv3.train.balance import attach_balance_losses


def test_a_model_materialised_from_meta_is_the_model_built_directly():
    config = dsv3.preset("tiny")
    ref = dsv3.build_model(config, seed=5).eval()
    model = dsv3.build_model(config, device="meta", seed=5)
    assert all(p.device.type == "meta" for p in model.parameters())
    losses = attach_balance_losses(model, "sequence")  # the trainer attaches them before parallelism
    materialize(model, torch.device("cpu"), config.initializer_range, 5)
    model.eval()
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(float(loss.weight) == 0 and float(loss.total) == 0 for loss in losses)
    tokens = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, ref(tokens).logits)  # the rotary tables too


def test_a_slice_of_the_experts_gets_the_whole_layer_s_values():
    config = dsv3.preset("tiny")
    full = dsv3.build_model(config, seed=7).state_dict()
    model = dsv3.build_model(config, device="meta", seed=7)
    moe = model.layers[1].mlp
    local = Experts(8, config.hidden_size, config.moe_intermediate_size).to("meta")
    local.first_expert = 8  # what expert parallelism's rank 1 of 2 holds
    moe.experts = local
    model.to_empty(device="cpu")
    init_weights(model, config.initializer_range, seed=7)
    for name in ("gate_up_proj", "down_proj"):
        assert torch.equal(getattr(local, name), full[f"layers.1.mlp.experts.{name}"][8:])
    assert torch.equal(model.layers[1].self_attn.q_a_proj.weight, full["layers.1.self_attn.q_a_proj.weight"])

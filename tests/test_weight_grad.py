"""Zero-bubble backward split: the input-gradient pass leaves the weight gradients for later, and I then W gives
exactly the gradients of one full backward (CPU, float64)."""

import copy

import torch

import dsv3
from dsv3.model import MoE
from dsv3.pipeline.weight_grad import DeferredExperts, DeferredLinear, WeightGradStore, defer_weight_gradients


def test_deferred_layers_split_the_backward_and_add_up_to_it():
    torch.manual_seed(0)
    layer = MoE(dsv3.preset("tiny").replace(hidden_size=32, moe_intermediate_size=16)).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    reference = copy.deepcopy(layer)
    store = WeightGradStore()
    defer_weight_gradients(layer, store)
    assert isinstance(layer.experts, DeferredExperts) and isinstance(layer.shared_experts.up_proj, DeferredLinear)
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    reference(xa).square().sum().backward()
    with store.deferring("mb0"):
        layer(xb).square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)  # the input gradient is complete after I
    assert layer.experts.gate_up_proj.grad is None and layer.shared_experts.down_proj.weight.grad is None
    assert layer.gate.weight.grad is not None  # small weights are not deferred
    store.run("mb0")
    for (name, p), q in zip(layer.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert len(store) == 0


def test_outside_a_deferring_block_the_weight_gradient_is_immediate():
    store = WeightGradStore()
    lin = DeferredLinear.from_linear(torch.nn.Linear(4, 3, bias=False), store)
    lin(torch.randn(5, 4)).sum().backward()
    assert lin.weight.grad is not None and len(store) == 0

"""Zero-bubble backward split: the input-gradient pass leaves the weight gradients for later, and I then W gives
exactly the gradients of one full backward (CPU, float64), for the FP8 layers bitwise those of their own backward."""

import copy

import pytest
import torch

import dsv3
from dsv3.fp8 import FP8Experts, FP8Linear, apply_fp8_training
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


def _fp8_moe(device: str, dtype: torch.dtype) -> MoE:
    # hidden 256 and expert width 128: whole 128-tiles, which every GPU backend takes
    config = dsv3.preset("tiny").replace(hidden_size=256, moe_intermediate_size=128)
    torch.manual_seed(0)
    layer = MoE(config).to(device=device, dtype=dtype)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return apply_fp8_training(layer)  # "auto": emulation on the CPU, scaled_mm / triton on Hopper


@pytest.mark.parametrize("device, dtype", [
    ("cpu", torch.float32), ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
])
def test_fp8_layers_defer_their_fp8_weight_gradients_bitwise(device, dtype):
    """FP8Linear (shared experts) and FP8Experts (routed): I leaves their FP8 dW GEMMs in the store, and I then W
    (two micro-batches, their W in reverse order) gives exactly the plain FP8 backward's gradients: the same
    quantised operands and the same GEMM, only run later; two micro-batches' gradients add up the same way."""
    layer = _fp8_moe(device, dtype)
    reference = copy.deepcopy(layer)
    store = WeightGradStore()
    defer_weight_gradients(layer, store)
    assert type(layer.experts) is FP8Experts and type(layer.shared_experts.up_proj) is FP8Linear
    assert layer.experts.weight_grad_fn == store.accumulate and reference.experts.weight_grad_fn is None
    xs = [torch.randn(2, 16, 256, device=device, dtype=dtype) for _ in range(2)]
    ins_ref = [x.clone().requires_grad_() for x in xs]
    ins = [x.clone().requires_grad_() for x in xs]
    for x in ins_ref:
        reference(x).float().square().sum().backward()
    for i, x in enumerate(ins):
        with store.deferring(i):
            layer(x).float().square().sum().backward()
        assert torch.equal(x.grad, ins_ref[i].grad)  # the input gradient is complete after I
    assert layer.experts.down_proj.grad is None and layer.shared_experts.gate_proj.weight.grad is None
    assert layer.gate.weight.grad is not None  # the gate is not deferred
    store.run(1)
    store.run(0)
    for (name, p), q in zip(layer.named_parameters(), reference.parameters()):
        assert p.grad.dtype == q.grad.dtype and torch.equal(p.grad, q.grad), name
    assert len(store) == 0


def test_fp8_weight_gradient_outside_a_deferring_block_is_immediate():
    store = WeightGradStore()
    lin = FP8Linear.from_linear(torch.nn.Linear(200, 130), backend="emulate")  # ragged tiles, a bias
    ref = copy.deepcopy(lin)
    defer_weight_gradients(torch.nn.Sequential(lin), store)
    x = torch.randn(5, 200)
    lin(x).sum().backward()
    ref(x).sum().backward()
    assert torch.equal(lin.weight.grad, ref.weight.grad) and torch.equal(lin.bias.grad, ref.bias.grad)
    assert len(store) == 0


def test_what_cannot_be_deferred_is_an_error():
    class OwnLinear(torch.nn.Linear):
        pass

    with pytest.raises(ValueError, match=r"cannot defer the weight gradients of 0 \(OwnLinear\)"):
        defer_weight_gradients(torch.nn.Sequential(OwnLinear(4, 4)), WeightGradStore())
    model = torch.nn.Sequential(FP8Linear.from_linear(torch.nn.Linear(4, 4)), torch.nn.Linear(4, 4, bias=False))
    store = WeightGradStore()
    defer_weight_gradients(model, store)
    defer_weight_gradients(model, store)  # again, the same store: nothing changes
    assert model[0].weight_grad_fn == store.accumulate and model[1].store is store
    with pytest.raises(ValueError, match="another WeightGradStore"):
        defer_weight_gradients(model, WeightGradStore())

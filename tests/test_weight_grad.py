"""Zero-bubble backward split: the input-gradient pass leaves the weight gradients for later, and I then W gives
exactly the gradients of one full backward (CPU, float64), for the FP8 layers bitwise those of their own backward."""

import copy

import pytest
import torch

import dsv3
from dsv3.fp8 import FP8Experts, FP8Linear, apply_fp8_training
from dsv3.model import MoE
from dsv3.model.moe import Experts
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


def _i_then_w(model: torch.nn.Module, inputs: list[torch.Tensor], loss) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """``model`` deferred to a store, each input's backward in its own deferring block, then the W chunks in
    reverse order; returns the (deferred) model and the input gradients after I."""
    store = WeightGradStore()
    defer_weight_gradients(model, store)
    grads = []
    for i, x in enumerate(inputs):
        x = x.clone().requires_grad_()
        with store.deferring(i):
            loss(model, x).backward()
        grads.append(x.grad)
    assert all(p.grad is None for m in model.modules() if isinstance(m, (FP8Linear, FP8Experts))
               for p in m.parameters(recurse=False) if p.dim() > 1)  # nothing of the FP8 dW GEMMs ran in I
    for i in reversed(range(len(inputs))):
        store.run(i)
    assert len(store) == 0
    return model, grads


def _assert_same_grads(model: torch.nn.Module, reference: torch.nn.Module, inputs, loss, grads) -> None:
    """The reference's plain (immediate) backward over the same inputs gives bitwise the same gradients."""
    for x, g in zip(inputs, grads):
        x = x.clone().requires_grad_()
        loss(reference, x).backward()
        assert torch.equal(x.grad, g)  # the input gradient is complete after I
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.grad.dtype == q.grad.dtype and torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_moe_i_then_w_is_its_fp8_backward_bitwise(dtype):
    """A MoE layer with FP8 shared experts (FP8Linear) and routed experts (FP8Experts), emulated: I leaves their
    FP8 dW GEMMs in the store (the gate's gradient is not deferred), and I then W over two micro-batches, their W
    in reverse order, gives exactly the plain FP8 backward's gradients: the same quantised operands and the same
    GEMM, only run later; the two micro-batches' gradients add up the same way."""
    torch.manual_seed(0)
    layer = MoE(dsv3.preset("tiny").replace(hidden_size=256, moe_intermediate_size=128)).to(dtype)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    layer = apply_fp8_training(layer, backend="emulate")
    reference = copy.deepcopy(layer)
    inputs = [torch.randn(2, 16, 256, dtype=dtype) for _ in range(2)]

    def loss(m, x):
        return m(x).float().square().sum()

    model, grads = _i_then_w(layer, inputs, loss)
    assert type(model.experts) is FP8Experts and type(model.shared_experts.up_proj) is FP8Linear
    assert reference.experts.weight_grad_fn is None
    _assert_same_grads(model, reference, inputs, loss, grads)


@pytest.mark.parametrize("device, dtype", [
    ("cpu", torch.float32), pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
])
def test_fp8_linear_and_experts_i_then_w_bitwise(device, dtype):
    """FP8Linear into FP8Experts (ragged expert counts, one expert empty), no routing: on a GPU the backends
    "auto" picks (scaled_mm, triton on Hopper) defer their dW GEMMs to the same effect, bitwise."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 256, bias=False)
    experts = Experts(4, 256, 128)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model = torch.nn.ModuleList([FP8Linear.from_linear(lin.to(device, dtype)),
                                 FP8Experts.from_experts(experts.to(device, dtype))])
    reference = copy.deepcopy(model)
    counts = torch.tensor([40, 0, 130, 30], device=device)
    weights = torch.randn(200, 256, device=device)  # dY fixed: no dependence on rounding upstream

    def loss(m, x):
        return (m[1](m[0](x), counts).float() * weights).sum()

    inputs = [torch.randn(200, 256, device=device, dtype=dtype) for _ in range(2)]
    model, grads = _i_then_w(model, inputs, loss)
    _assert_same_grads(model, reference, inputs, loss, grads)


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

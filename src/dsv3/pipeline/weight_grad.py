"""Splitting a backward into its input-gradient and weight-gradient halves (zero-bubble pipelining, report
§3.2.1: "backward for input" and "backward for weights").

Nothing downstream waits for a weight gradient, so a pipeline may compute dX = dY W first (the ``I`` chunk, which
the previous stage needs) and dW = dY^T X later (the ``W`` chunk, in what would be a bubble). Autograd computes
both in one pass; :func:`defer_weight_gradients` swaps, from outside the model, every ``nn.Linear`` of the blocks
and every routed :class:`~dsv3.model.moe.Experts` for versions whose backward hands the dW work to a
:class:`WeightGradStore` while the store is deferring, and does it at once otherwise. Other weights (norms, the
gate, the embedding: little work) get their gradients in the ``I`` chunk.

FP8 layers (:class:`~dsv3.fp8.FP8Linear`, :class:`~dsv3.fp8.FP8Experts`, report §3.3) stay as they are: their
backward already computes dW through an optional ``weight_grad_fn``, which is pointed at the store. ``I`` then
quantises dY (both layouts, as the plain FP8 backward does) and computes dX; ``W`` runs the FP8 dW GEMM on the
kept FP8 operands, so ``I`` then ``W`` gives bitwise the plain FP8 backward's gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import Experts


class WeightGradStore:
    """Weight-gradient work put aside by backward passes run inside :meth:`deferring`, replayed by :meth:`run`."""

    def __init__(self) -> None:
        self.enabled = False
        self._pending: list[Callable[[], None]] = []
        self._queued: dict[object, list[Callable[[], None]]] = {}

    @contextlib.contextmanager
    def deferring(self, key: object) -> Iterator[None]:
        """Backward passes in this block leave their weight gradients under ``key``."""
        self.enabled = True
        try:
            yield
        finally:
            self.enabled = False
            self._queued[key] = self._pending
            self._pending = []

    def put(self, work: Callable[[], None]) -> None:
        if self.enabled:
            self._pending.append(work)
        else:
            work()

    def accumulate(self, param: torch.Tensor, compute: Callable[[], torch.Tensor]) -> None:
        """Add ``compute()`` to ``param.grad``, at :meth:`run` while deferring, at once otherwise (the
        ``weight_grad_fn`` of the FP8 layers, :data:`dsv3.fp8.linear.WeightGradFn`)."""
        self.put(lambda: _accumulate(param, compute()))

    def run(self, key: object) -> None:
        """Compute the weight gradients put aside under ``key``."""
        for work in self._queued.pop(key):
            work()

    def __len__(self) -> int:
        return len(self._queued)


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul in here (the input's own dtype without autocast)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _LinearFn(torch.autograd.Function):
    """y = x W^T whose weight gradient goes through a store."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, store: WeightGradStore) -> torch.Tensor:
        dtype = _compute_dtype(x)
        xc, wc = x.to(dtype), weight.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(xc, wc)
        ctx.save_for_backward(xc, wc)
        ctx.store, ctx.weight, ctx.x_dtype = store, weight, x.dtype
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        xc, wc = ctx.saved_tensors
        gy = gy.to(wc.dtype)
        gx = (gy @ wc).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            weight = ctx.weight

            def weight_grad() -> None:
                _accumulate(weight, gy.reshape(-1, gy.shape[-1]).t() @ xc.reshape(-1, xc.shape[-1]))

            ctx.store.put(weight_grad)
        return gx, None, None


class DeferredLinear(nn.Linear):
    """``nn.Linear`` (no bias) whose weight gradient can be deferred; shares the original's parameters."""

    store: WeightGradStore

    @classmethod
    def from_linear(cls, linear: nn.Linear, store: WeightGradStore) -> "DeferredLinear":
        if linear.bias is not None:
            raise ValueError("DeferredLinear: layers with a bias are not used by dsv3's blocks")
        new = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        new.weight, new.store = linear.weight, store
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearFn.apply(x, self.weight, self.store)


class _GroupedFn(torch.autograd.Function):
    """y[rows of e] = x[rows of e] W_e^T for every expert e, weight gradients through a store."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, sizes: list[int], store: WeightGradStore) -> torch.Tensor:
        dtype = _compute_dtype(x)
        xc, wc = x.to(dtype), weight.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = torch.cat([chunk @ wc[e].t() for e, chunk in enumerate(xc.split(sizes))]) if sizes else xc
        ctx.save_for_backward(xc, wc)
        ctx.sizes, ctx.store, ctx.weight, ctx.x_dtype = sizes, store, weight, x.dtype
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        xc, wc = ctx.saved_tensors
        gy = gy.to(wc.dtype)
        sizes = ctx.sizes
        gx = torch.cat([g @ wc[e] for e, g in enumerate(gy.split(sizes))]).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            weight = ctx.weight

            def weight_grad() -> None:
                grad = torch.stack([g.t() @ x for g, x in zip(gy.split(sizes), xc.split(sizes))])
                _accumulate(weight, grad)

            ctx.store.put(weight_grad)
        return gx, None, None, None


class DeferredExperts(Experts):
    """Routed experts (one matmul per expert) whose weight gradients can be deferred; shares the parameters."""

    store: WeightGradStore

    @classmethod
    def from_experts(cls, experts: Experts, store: WeightGradStore) -> "DeferredExperts":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.n_experts, new.inter_dim, new.implementation = experts.n_experts, experts.inter_dim, "loop"
        new.first_expert = experts.first_expert
        new.gate_up_proj, new.down_proj, new.store = experts.gate_up_proj, experts.down_proj, store
        new.train(experts.training)
        return new

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        sizes = counts.tolist()
        h = _GroupedFn.apply(x, self.gate_up_proj, sizes, self.store)
        gate, up = h.split(self.inter_dim, dim=-1)
        return _GroupedFn.apply(F.silu(gate) * up, self.down_proj, sizes, self.store)


def defer_weight_gradients(model: nn.Module, store: WeightGradStore) -> nn.Module:
    """Route the weight gradients of the blocks' Linear layers and routed experts through ``store`` (in place; the
    same parameters): plain ones are swapped for their deferring versions, FP8 ones get ``store`` as their
    ``weight_grad_fn``. Applying it again with the same store changes nothing; a Linear or Experts subclass this
    does not know, with trainable weights, is a ValueError rather than a backward left unsplit."""
    from ..fp8 import FP8Experts, FP8Linear

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (FP8Linear, FP8Experts)):
                if child.weight_grad_fn not in (None, store.accumulate):
                    raise ValueError(f"{name}: its weight gradients already go to another WeightGradStore")
                child.weight_grad_fn = store.accumulate
            elif isinstance(child, (DeferredLinear, DeferredExperts)):
                if child.store is not store:
                    raise ValueError(f"{name}: its weight gradients already go to another WeightGradStore")
            elif type(child) is nn.Linear:
                setattr(module, name, DeferredLinear.from_linear(child, store))
            elif type(child) is Experts:
                setattr(module, name, DeferredExperts.from_experts(child, store))
            elif isinstance(child, (nn.Linear, Experts)) and any(p.requires_grad for p in child.parameters()):
                raise ValueError(f"zero-bubble schedules cannot defer the weight gradients of {name} "
                                 f"({type(child).__name__}): use --pp-schedule 1f1b")
    return model

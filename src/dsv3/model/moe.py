"""DeepSeekMoE: shared + fine-grained routed experts with sigmoid affinities (report §2.1.2, eq. 12-20).

A layer computes ``h' = h + sum_i FFN^(s)_i(h) + sum_i g_i FFN^(r)_i(h)`` in three steps, so that expert
parallelism can later replace dispatch and combine without touching the rest:

1. :class:`Gate` picks K_r experts per token and their gate values (eq. 13-16, group-limited routing);
2. :func:`dispatch` sorts the token copies by expert; :class:`Experts` runs each expert on its contiguous
   slice (a grouped GEMM on the GPU, a plain loop as the reference); :func:`combine` weights the outputs by
   the gates and sums them back per token. No token is ever dropped. (``MoE.send`` / ``MoE.receive`` are the
   seam where expert parallelism moves the sorted copies to the ranks that hold their experts and back.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .balance_loss import BalanceLoss
from .ffn import MLP


class Gate(nn.Module):
    """Router: affinities s = sigmoid(u e_i) (eq. 15), top-K_r selection on s + b restricted to the best
    ``topk_group`` expert groups, gate values from s alone, normalised and scaled (eq. 13-14, 16).

    The bias b (``e_score_correction_bias``, auxiliary-loss-free balancing) is a buffer, not a parameter: the
    trainer moves it by +-gamma after each step; it changes which experts are chosen, never the gate values.
    In training the gate also counts the tokens it sends to each expert (``tokens_per_expert``, on the device,
    no host sync) until the trainer reads and zeroes them: the load the bias update and MaxVio see.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_groups = config.n_group
        self.topk_groups = config.topk_group
        self.score_func = config.scoring_func
        self.norm_topk = config.norm_topk_prob
        self.route_scale = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        if config.uses_bias_routing:
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.register_buffer("tokens_per_expert", torch.zeros(self.n_experts, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, d) -> gate values (T, K) float32, expert indices (T, K), affinities s (T, E) float32."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.n_groups > 1:
            grouped = choice.view(-1, self.n_groups, self.n_experts // self.n_groups)
            # A group's score: the sum of its top-2 biased affinities (V3), or its best affinity (V2).
            if self.e_score_correction_bias is None:
                group_scores = grouped.amax(dim=-1)
            else:
                group_scores = grouped.topk(2, dim=-1, sorted=False).values.sum(dim=-1)
            keep = group_scores.topk(self.topk_groups, dim=-1, sorted=False).indices
            group_mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(group_mask.unsqueeze(-1), float("-inf")).flatten(1)
        indices = choice.topk(self.top_k, dim=-1, sorted=False).indices  # order is irrelevant: no sort
        if self.training:
            self.tokens_per_expert.add_(expert_counts(indices.flatten(), self.n_experts))
        weights = scores.gather(1, indices)
        if self.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices, scores


def expert_counts(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Copies per expert (E,) int64 of the expert ids ``ids`` (N,), counted on the device: ``torch.bincount``
    reads the ids' max back to the host on CUDA (a sync per MoE layer, and nothing a CUDA graph can capture)."""
    return torch.zeros(n_experts, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def dispatch(x: torch.Tensor, indices: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy each token once per chosen expert, sorted by expert.

    x (T, d), indices (T, K) -> x_sorted (T*K, d), order (T*K,) = position of each sorted copy in the flat
    (token, k) list, counts (E,) = tokens per expert (int64, on x's device: no host sync).
    """
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    return copy_tokens(x, order, indices.shape[1]), order, expert_counts(flat, n_experts)


def copy_tokens(x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """``x[order // k]``: row i is the token of sorted copy i, with a backward that gives the same bits on
    every run. On CUDA that is autograd's own (its accumulating ``index_put_`` sorts the indices and adds each
    row's terms in that order); on the CPU the threads add them in any order, so :class:`_CopyTokens` is used."""
    if x.is_cuda:
        return x[order // k]
    return _CopyTokens.apply(x, order, k)


def unsort(y_sorted: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows back in (token, k) order: row ``order[i]`` <- ``y_sorted[i]``. ``order`` is a permutation, so no
    two rows collide: a plain copy, no atomics, the same result at any thread count."""
    return y_sorted.new_empty(y_sorted.shape).index_copy_(0, order, y_sorted)


class _CopyTokens(torch.autograd.Function):
    """``x[order // K]`` with a deterministic backward on the CPU.

    Autograd's backward of that indexing is an accumulating ``index_put_``; on the CPU its threads add the K
    copies of a token into one row in whatever order they run, so two identical training runs drift apart.
    Here the gradient of the copies is put back in (token, k) order and summed over k. (On an H200 this form
    is slower than CUDA's own deterministic ``index_put_``: docs/training.md.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(order)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        return unsort(grad, order).view(-1, ctx.k, grad.shape[-1]).sum(dim=1), None, None


def combine(y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dispatch`: sum_k g_k * y_k per token. weights (T, K) -> (T, d).

    The sorted outputs go back to (token, k) order through the permutation ``order`` (:func:`unsort`; its
    gradient is a gather), then each token's K outputs are weighted by their gates and summed."""
    n_tokens, k = weights.shape
    y = unsort(y_sorted, order)
    return (y.view(n_tokens, k, -1) * weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)


class Experts(nn.Module):
    """The routed experts' weights stacked: ``gate_up_proj`` (E, 2I, d) holds [W1; W3] of each SwiGLU expert,
    ``down_proj`` (E, d, I) its W2, so that all experts run as one grouped GEMM."""

    first_expert: int = 0
    """Index in the layer of the first expert held here (expert parallelism holds a slice)."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.inter_dim = inter_dim
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.implementation = "auto"
        """``loop`` (reference: one matmul per expert), ``grouped`` (torch._grouped_mm) or ``auto``."""

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (N, d) sorted by expert with ``counts`` (E,) rows each -> (N, d)."""
        impl = self.implementation
        if impl == "auto":
            impl = "grouped" if _grouped_mm_ok(x, self.gate_up_proj) else "loop"
        if impl == "grouped":  # bf16 (under autocast the FP32 master weights are cast, as autocast would)
            offsets = counts.cumsum(0).to(torch.int32)
            w1, w2 = self.gate_up_proj.to(torch.bfloat16), self.down_proj.to(torch.bfloat16)
            h = torch._grouped_mm(x.to(torch.bfloat16), w1.transpose(-2, -1), offs=offsets)
            gate, up = h.split(self.inter_dim, dim=-1)
            return torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offsets)
        out = []
        # in training an expert without tokens still runs (on zero rows): its weights get a zero gradient rather
        # than none, so that AdamW steps them as it steps the whole stacked tensor (expert parallelism's local
        # experts may all go without tokens in a step); in inference it is skipped
        run_empty = torch.is_grad_enabled() and self.gate_up_proj.requires_grad
        for e, chunk in enumerate(x.split(counts.tolist())):
            if chunk.shape[0] == 0 and not run_empty:
                out.append(chunk)
                continue
            gate, up = F.linear(chunk, self.gate_up_proj[e]).split(self.inter_dim, dim=-1)
            out.append(F.linear(F.silu(gate) * up, self.down_proj[e]))
        return torch.cat(out) if out else x


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm runs on Hopper-class GPUs in bf16 with 16-byte aligned strides."""
    bf16 = (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16) or (
        torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16)
    return (
        x.is_cuda and bf16 and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
        and x.shape[-1] % 8 == 0 and w.shape[1] % 8 == 0
    )


class MoE(nn.Module):
    """One DeepSeekMoE layer (eq. 12): shared experts on every token plus K_r routed experts.

    ``balance_loss`` is None in the model as built; the trainer attaches a :class:`BalanceLoss` (eq. 17-20),
    which then acts in training only."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.gate = Gate(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.n_shared_experts * config.moe_intermediate_size)
            if config.n_shared_experts > 0 else None
        )
        self.balance_loss: BalanceLoss | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        weights, indices, scores = self.gate(flat)
        x_sorted, counts, routing = self.send(flat, indices)
        y = combine(self.receive(self.experts(x_sorted, counts), routing), routing[0], weights).to(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if self.balance_loss is not None and self.training:
            y = self.balance_loss(y, scores, indices, b, normalise=self.gate.score_func == "sigmoid")
        return y.view(b, s, d)

    def send(self, flat: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Bring each token copy to its expert: (copies sorted by expert, copies per expert (E,), the routing
        that :meth:`receive` and :func:`combine` need, ``order`` first). Expert parallelism overrides the pair
        (:mod:`dsv3.train.expert_parallel`); here every expert is local."""
        x_sorted, order, counts = dispatch(flat, indices, self.n_experts)
        return x_sorted, counts, (order,)

    def receive(self, y_sorted: torch.Tensor, routing: tuple) -> torch.Tensor:
        """The experts' outputs back in :meth:`send`'s sorted order (nothing to do when all experts are here)."""
        return y_sorted

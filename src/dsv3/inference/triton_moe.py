"""Triton kernels for the MoE of a decode step: the experts' GEMMs for a few rows, and the top-k routing.

In a decode step each expert sees a handful of token copies (1 at batch 1; about 3 at batch 32 with 64
experts, top-6), so the step is bound by reading the chosen experts' weights once. ``torch._grouped_mm``
(CUTLASS) tiles for large groups: on the "16b" shapes it reads the six experts of a batch-1 step at
under 1 TB/s, and spends a launch on preparing its problem list. Here:

* :func:`~dsv3.kernels.few_rows.grouped_mm_few_rows` (copies sorted by expert; in :mod:`dsv3.kernels`, as
  the FP8 Linear layers of :mod:`dsv3.fp8.serving` run it too): one program per (expert, column tile),
  which returns at once when its expert received no rows;
* :func:`moe_decode_experts` (at most 16 tokens, unsorted): the routed and the shared experts in two
  kernels (gate-up with SiLU, then down), each program finding its tokens in the routing indices;
  weights in the activations' dtype or FP8 with 128 x 128 block factors (as the few-rows kernel);
* :func:`route_topk`: the top-k of the biased affinities and the gate values, one program per token.

Imported lazily (Triton is optional); the functions are ``torch.library`` custom ops, so that
``torch.compile`` keeps each as one opaque call and CUDA graphs capture them. The references are the
experts' plain loop / ``torch._grouped_mm`` (:class:`dsv3.model.moe.Experts`) and the model's
:class:`~dsv3.model.moe.Gate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..kernels.few_rows import fp8_prune

# ------------------------------------------------------------------------------------------------------
# A few tokens, no sort: each expert program finds its own tokens in the routing indices

# Tokens up to which moe_decode_experts runs: one 16-row tile of tl.dot holds them all (the caller,
# dsv3.inference.moe, sends at most its DECODE_FUSED_MAX; more is refused below).
DECODE_MAX_TOKENS = 16

_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(32, 256, 4, 4), (64, 128, 4, 4), (32, 128, 4, 6), (16, 256, 4, 4), (64, 256, 8, 3),
                         (32, 512, 4, 3), (16, 512, 4, 3), (64, 256, 4, 4),
                         (16, 128, 4, 6), (64, 128, 4, 6), (128, 128, 8, 4)]  # the last three: FP8 only
]



@triton.jit
def _token_selection(ids_ptr, T, TOP_K, N_ROUTED, BLOCK_T: tl.constexpr, TOPK_P2: tl.constexpr,
                     BY_SLOT: tl.constexpr):
    """The expert (or shared piece) e of this program, which of the (at most BLOCK_T) tokens it serves, and
    the row of its result for each.

    Routed expert e < N_ROUTED: the tokens whose top-k contains e, at row t * TOP_K + k (the copy's place in
    the (T, K) routing). Shared piece v = e - N_ROUTED: every token, at row T * TOP_K + v * T + t. Programs
    are experts (a program per expert, most without tokens at small T), or with BY_SLOT (one token) the
    token's copies: program p < TOP_K runs its p-th routed expert, the next ones the shared pieces."""
    p = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    if BY_SLOT:
        e = tl.where(p < TOP_K, tl.load(ids_ptr + tl.minimum(p, TOP_K - 1)).to(tl.int32), N_ROUTED + p - TOP_K)
        sel = t < 1
        row = p + 0 * t
    elif p < N_ROUTED:
        e = p
        kk = tl.arange(0, TOPK_P2)
        ids = tl.load(ids_ptr + t[:, None] * TOP_K + kk[None, :],
                      mask=(t[:, None] < T) & (kk[None, :] < TOP_K), other=-1)
        hit = ids == e
        sel = tl.sum(hit.to(tl.int32), axis=1) > 0
        row = t * TOP_K + tl.sum(tl.where(hit, kk[None, :], 0), axis=1)
    else:
        e = p
        sel = t < T
        row = T * TOP_K + (e - N_ROUTED) * T + t
    return e, sel, row


_DECODE_TUNING = dict(configs=_DECODE_CONFIGS, key=["D", "INTER", "BLOCK_T", "BY_SLOT", "FP8"],
                      prune_configs_by={"early_config_prune": fp8_prune(8)})


@triton.jit
def _dot_tile(acc, x, w, s_ptr, FP8: tl.constexpr):
    """acc + x @ w.T; an FP8 tile widened to x's dtype and its product times the block's factor at s_ptr."""
    if FP8:
        acc = acc + tl.dot(x, tl.trans(w.to(x.dtype))) * tl.load(s_ptr)
    else:
        acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.autotune(**_DECODE_TUNING)
@triton.jit
def _moe_decode_gate_up_kernel(
    x_ptr, ids_ptr, w_ptr, ws_ptr, s_ptr, ss_ptr, act_ptr,
    T, TOP_K, N_ROUTED, D, INTER, INTER_SHARED,
    stride_xt, stride_we, stride_wn, stride_wsn, stride_se, stride_sn, stride_ssn, stride_act,
    BLOCK_T: tl.constexpr, TOPK_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BY_SLOT: tl.constexpr, FP8: tl.constexpr,
):
    """act[row] = silu(x_t W1_e^T) * (x_t W3_e^T) for the tokens t of expert (or shared piece) e."""
    e, sel, row = _token_selection(ids_ptr, T, TOP_K, N_ROUTED, BLOCK_T, TOPK_P2, BY_SLOT)
    if e < N_ROUTED:
        w_base = w_ptr + e.to(tl.int64) * stride_we
        s_base = s_ptr + e.to(tl.int64) * stride_se
        gate_row = e * 0  # a tensor in both branches
        up_row = e * 0 + INTER
        w_stride = stride_wn
        s_stride = stride_sn
    else:  # shared experts: [W1; W3] of one MLP of INTER_SHARED = pieces x INTER, cut into INTER-wide pieces
        w_base = ws_ptr
        s_base = ss_ptr
        gate_row = (e - N_ROUTED) * INTER
        up_row = INTER_SHARED + gate_row
        w_stride = stride_wsn
        s_stride = stride_ssn
    if tl.max(sel.to(tl.int32), axis=0) > 0:
        t = tl.arange(0, BLOCK_T)
        n0 = tl.program_id(1) * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        gate_w = w_base + (gate_row + cols[:, None]).to(tl.int64) * w_stride
        up_w = w_base + (up_row + cols[:, None]).to(tl.int64) * w_stride
        gate_s = s_base + ((gate_row + n0) // 128) * s_stride  # FP8: the tile's row of block factors
        up_s = s_base + ((up_row + n0) // 128) * s_stride
        acc_g = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + ks
            x = tl.load(x_ptr + t[:, None] * stride_xt + k[None, :], mask=sel[:, None] & (k[None, :] < D), other=0.0)
            w_mask = (cols[:, None] < INTER) & (k[None, :] < D)
            wg = tl.load(gate_w + k[None, :], mask=w_mask, other=0.0)
            wu = tl.load(up_w + k[None, :], mask=w_mask, other=0.0)
            acc_g = _dot_tile(acc_g, x, wg, gate_s + k0 // 128, FP8)
            acc_u = _dot_tile(acc_u, x, wu, up_s + k0 // 128, FP8)
        act = acc_g * tl.sigmoid(acc_g) * acc_u
        tl.store(act_ptr + row[:, None] * stride_act + cols[None, :], act.to(act_ptr.dtype.element_ty),
                 mask=sel[:, None] & (cols[None, :] < INTER))


@triton.autotune(**_DECODE_TUNING)
@triton.jit
def _moe_decode_down_kernel(
    act_ptr, ids_ptr, w_ptr, ws_ptr, s_ptr, ss_ptr, y_ptr,
    T, TOP_K, N_ROUTED, D, INTER,
    stride_act, stride_we, stride_wn, stride_wsn, stride_se, stride_sn, stride_ssn, stride_y,
    BLOCK_T: tl.constexpr, TOPK_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BY_SLOT: tl.constexpr, FP8: tl.constexpr,
):
    """y[row] = act[row] W2_e^T (FP32) for the rows of expert (or shared piece) e."""
    e, sel, row = _token_selection(ids_ptr, T, TOP_K, N_ROUTED, BLOCK_T, TOPK_P2, BY_SLOT)
    if e < N_ROUTED:
        w = w_ptr + e.to(tl.int64) * stride_we
        s_base = s_ptr + e.to(tl.int64) * stride_se
        first_col = e * 0
        w_stride = stride_wn
        s_stride = stride_sn
    else:  # the shared W2's columns of this piece
        w = ws_ptr
        s_base = ss_ptr
        first_col = (e - N_ROUTED) * INTER
        w_stride = stride_wsn
        s_stride = stride_ssn
    if tl.max(sel.to(tl.int32), axis=0) > 0:
        n0 = tl.program_id(1) * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        s_row = s_base + (n0 // 128) * s_stride
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, INTER, BLOCK_K):
            k = k0 + ks
            a = tl.load(act_ptr + row[:, None] * stride_act + k[None, :],
                        mask=sel[:, None] & (k[None, :] < INTER), other=0.0)
            wd = tl.load(w + cols[:, None].to(tl.int64) * w_stride + first_col + k[None, :],
                         mask=(cols[:, None] < D) & (k[None, :] < INTER), other=0.0)
            acc = _dot_tile(acc, a, wd, s_row + (first_col + k0) // 128, FP8)
        tl.store(y_ptr + row[:, None] * stride_y + cols[None, :], acc, mask=sel[:, None] & (cols[None, :] < D))


@torch.library.custom_op("dsv3::moe_decode_experts", mutates_args=())
def moe_decode_experts(
    x: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
    shared_gate_up: torch.Tensor | None, shared_down: torch.Tensor | None,
    scales: Sequence[torch.Tensor],
) -> torch.Tensor:
    """The routed and shared experts of at most :data:`DECODE_MAX_TOKENS` tokens in two kernels, without
    sorting the token copies by expert.

    x (T, d); ``indices`` (T, K) the routed experts of each token; ``gate_up`` (E, 2I, d) and ``down``
    (E, d, I) the stacked routed experts; ``shared_gate_up`` (2 I_s, d) = [W1; W3] and ``shared_down``
    (d, I_s) the shared experts' MLP with I_s a multiple of I (DeepSeekMoE: I_s = n_shared x I), or None.
    FP8 weights (float8_e4m3fn) come with ``scales`` (else empty): the 128 x 128 block factors of gate_up, down and,
    with shared experts, of shared_gate_up and shared_down (I a multiple of 128).
    One program per (expert, column tile) reads the routing indices, returns at once if no token chose
    its expert, and otherwise streams its weight tile once for all of its tokens; the shared MLP runs as
    I_s / I more "experts" that every token chose. Returns FP32 (T K + T I_s / I, d): row t K + k is token
    t's k-th routed expert's output (unweighted), row T K + v T + t token t's part from shared piece v
    (the shared output is the sum over v)."""
    t, d = x.shape
    if t > DECODE_MAX_TOKENS:
        raise ValueError(f"moe_decode_experts takes at most {DECODE_MAX_TOKENS} tokens, got {t}")
    n_routed, two_inter, _ = gate_up.shape
    inter = two_inter // 2
    top_k = indices.shape[1]
    pieces = 0 if shared_gate_up is None else shared_down.shape[1] // inter
    fp8 = gate_up.dtype == torch.float8_e4m3fn
    if fp8 != bool(scales) or fp8 and (inter % 128 or len(scales) != (4 if pieces else 2)):
        raise ValueError("moe_decode_experts: FP8 weights need their block scales (and I a multiple of 128)")
    ws = gate_up if shared_gate_up is None else shared_gate_up.contiguous()
    wsd = down if shared_down is None else shared_down.contiguous()
    if fp8:
        scales = [f.contiguous() for f in scales]
    s13, s2 = (scales[0], scales[1]) if fp8 else (x, x)  # not read without FP8
    ss13, ss2 = (scales[2], scales[3]) if fp8 and pieces else (s13, s2)
    x, indices = x.contiguous(), indices.contiguous()
    rows = t * top_k + pieces * t
    act = torch.empty(rows, inter, device=x.device, dtype=x.dtype)
    y = torch.empty(rows, d, device=x.device, dtype=torch.float32)
    if t == 0:
        return y
    by_slot = t == 1  # one token: a program per copy, not per expert (no programs for the unchosen)
    programs = (top_k if by_slot else n_routed) + pieces
    meta = dict(BLOCK_T=DECODE_MAX_TOKENS, TOPK_P2=triton.next_power_of_2(top_k), BY_SLOT=by_slot, FP8=fp8)

    def strides(s3, s2d):  # (expert, row block) of the routed factors, row block of the shared ones
        return (s3.stride(0), s3.stride(1), s2d.stride(0)) if fp8 else (0, 0, 0)

    _moe_decode_gate_up_kernel[lambda m: (programs, triton.cdiv(inter, m["BLOCK_N"]))](
        x, indices, gate_up, ws, s13, ss13, act, t, top_k, n_routed, d, inter, pieces * inter,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), ws.stride(0), *strides(s13, ss13), act.stride(0),
        **meta,
    )
    _moe_decode_down_kernel[lambda m: (programs, triton.cdiv(d, m["BLOCK_N"]))](
        act, indices, down, wsd, s2, ss2, y, t, top_k, n_routed, d, inter,
        act.stride(0), down.stride(0), down.stride(1), wsd.stride(0), *strides(s2, ss2), y.stride(0), **meta,
    )
    return y


@moe_decode_experts.register_fake
def _(x, indices, gate_up, down, shared_gate_up, shared_down, scales):
    pieces = 0 if shared_gate_up is None else shared_down.shape[1] // (gate_up.shape[1] // 2)
    t = x.shape[0]
    return x.new_empty(t * indices.shape[1] + pieces * t, x.shape[1], dtype=torch.float32)


# ------------------------------------------------------------------------------------------------------
# routing of a few tokens: top-k of the biased affinities, gate values, in one small kernel

@triton.jit
def _route_topk_kernel(scores_ptr, bias_ptr, idx_ptr, w_ptr, E, route_scale, TOP_K: tl.constexpr,
                       K_P2: tl.constexpr, BLOCK_E: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr):
    tok = tl.program_id(0)
    es = tl.arange(0, BLOCK_E)
    s = tl.load(scores_ptr + tok * E + es, mask=es < E, other=0.0)
    choice = s
    if HAS_BIAS:
        choice = s + tl.load(bias_ptr + es, mask=es < E, other=0.0)
    choice = tl.where(es < E, choice, float("-inf"))
    ks = tl.arange(0, K_P2)
    chosen = tl.zeros((K_P2,), dtype=tl.int32)
    gates = tl.zeros((K_P2,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        e = tl.argmax(choice, axis=0, tie_break_left=True)  # the best left; ties to the lower index
        chosen = tl.where(ks == k, e, chosen)
        gates = tl.where(ks == k, tl.sum(tl.where(es == e, s, 0.0), axis=0), gates)
        choice = tl.where(es == e, float("-inf"), choice)
    if NORM:
        gates = gates / (tl.sum(gates, axis=0) + 1e-20)
    tl.store(idx_ptr + tok * TOP_K + ks, chosen.to(tl.int64), mask=ks < TOP_K)
    tl.store(w_ptr + tok * TOP_K + ks, gates * route_scale, mask=ks < TOP_K)


@torch.library.custom_op("dsv3::route_topk", mutates_args=())
def route_topk(
    scores: torch.Tensor, bias: torch.Tensor | None, top_k: int, norm_topk: bool, route_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 13-16 with the bias term of §2.1.2, after the affinities: for ``scores`` (T, E) (s_i,t), the
    experts of the top_k largest s + ``bias`` in rank order (ties to the lower index), (T, top_k) int64,
    and their gate values s, normalised over the top-k if ``norm_topk``, times ``route_scale`` (T, top_k)
    FP32. One program per token (a decode step's few tokens)."""
    t, e = scores.shape
    scores = scores.float().contiguous()
    idx = torch.empty(t, top_k, device=scores.device, dtype=torch.long)
    w = torch.empty(t, top_k, device=scores.device, dtype=torch.float32)
    if t:
        _route_topk_kernel[(t,)](scores, scores if bias is None else bias.float().contiguous(), idx, w, e, route_scale,
                                 TOP_K=top_k, K_P2=triton.next_power_of_2(top_k), BLOCK_E=triton.next_power_of_2(e),
                                 HAS_BIAS=bias is not None, NORM=norm_topk, num_warps=1)
    return idx, w


@route_topk.register_fake
def _(scores, bias, top_k, norm_topk, route_scale):
    t = scores.shape[0]
    return scores.new_empty(t, top_k, dtype=torch.long), scores.new_empty(t, top_k, dtype=torch.float32)

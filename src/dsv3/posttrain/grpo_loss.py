"""The GRPO objective: group-relative advantages, per-token log-probabilities, the clipped surrogate with the k3
KL penalty, and the loss normalisations later work proposed.

GRPO (DeepSeekMath, arXiv 2402.03300, §4.1 eq. 3; DeepSeek-V3 report §5.2.2 eq. 26-28) samples G outputs
o_1..o_G per question q from the old policy and maximises

    J(theta) = E[ 1/G sum_i 1/|o_i| sum_t { min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps) A_i)
                                             - beta D_KL,it } ]                                   (eq. 3)

    rho_it  = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    D_KL,it = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1    (per token, >= 0; eq. 4 / report eq. 27)
    A_i     = (r_i - mean(r)) / std(r)                          (outcome supervision; report eq. 28)

The report writes eq. 26 with sequence-level ratios; DeepSeekMath's eq. 3 is the per-token form implemented here,
as in the common open implementations (TRL, verl): a product of per-token ratios over a long output leaves the
clip band almost always.

Later normalisations of the same per-token objective, selected by ``norm`` in :func:`grpo_loss`:

* ``"sequence"``: eq. 3 as written, the mean over sequences of each sequence's token mean.
* ``"token"``: DAPO (arXiv 2503.14476): the sum over all tokens of the batch / the number of tokens, so
  a long sequence's tokens weigh as much as a short one's.
* ``"constant"``: Dr. GRPO (arXiv 2503.20783): the sum / (number of sequences * a constant ``max_len``),
  removing the 1/|o_i| length bias; with ``scale="none"`` in :func:`group_advantages` it also drops the
  1/std(r) difficulty bias.

The training loop computes log-probabilities with :func:`token_logprobs`, advantages with
:func:`group_advantages`, and the loss with :func:`grpo_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Scale = Literal["std", "none"]
Norm = Literal["sequence", "token", "constant"]


# --- documented defaults --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossPreset:
    """One published setting of the loss's knobs (a reference for the command's config, not the config)."""

    beta: float
    """KL coefficient (0 = no KL term, no reference model needed)."""
    eps_low: float
    """Clip range below: rho >= 1 - eps_low."""
    eps_high: float
    """Clip range above: rho <= 1 + eps_high."""
    norm: Norm
    scale: Scale
    source: str


DEEPSEEKMATH = LossPreset(0.04, 0.2, 0.2, "sequence", "std",
                          "DeepSeekMath: beta 0.04, per-sequence token means (eq. 3); eps 0.2, PPO's usual value")
"""The original GRPO (DeepSeekMath; the V3 report gives no RL hyperparameters)."""

R1 = LossPreset(0.001, 10.0, 10.0, "sequence", "std",
                "DeepSeek-R1 (arXiv 2501.12948): KL coefficient 0.001, clip ratio 10 in the first RL stage")
"""DeepSeek-R1's first RL stage."""

DAPO = LossPreset(0.0, 0.2, 0.28, "token", "std",
                  "DAPO (arXiv 2503.14476): no KL, clip-higher eps_high 0.28, token-level loss")
"""DAPO (also drops groups whose rewards are all equal: see :func:`equal_reward_groups`)."""

DR_GRPO = LossPreset(0.0, 0.2, 0.2, "constant", "none",
                     "Dr. GRPO (arXiv 2503.20783): no std division, constant length normaliser; "
                     "beta 0 is our choice (not part of its change)")
"""Dr. GRPO."""

TRL = LossPreset(0.0, 0.2, 0.2, "token", "std", "TRL GRPOTrainer defaults: beta 0, eps 0.2, loss 'dapo'")
"""Hugging Face TRL's GRPOTrainer defaults (std with Bessel's correction + 1e-4, as here)."""

BETA = DEEPSEEKMATH.beta
EPS = DEEPSEEKMATH.eps_low
ADV_EPS = 1e-4
"""Added to std(r) before dividing (TRL's 1e-4): a group with a tiny spread gets large but finite advantages."""


# --- advantages -------------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, scale: Scale = "std", eps: float = ADV_EPS) -> torch.Tensor:
    """Outcome advantages (report eq. 28), one per output: ``A_i = (r_i - mean(r)) / (std(r) + eps)`` per group.

    ``rewards`` is (n_groups, G), a row per question. ``std`` is the sample standard deviation (Bessel's
    correction, ``torch.std``'s default, as TRL): the papers write ``std`` without saying which, and with it
    G = 2 rewards {0, 1} give advantages of about ±0.71 rather than ±1. ``scale="none"`` is Dr. GRPO's
    unscaled ``r_i - mean(r)``. A group whose rewards are all equal gets exactly 0 (no signal), not a rounding
    residue of the mean. Returns a float tensor shaped like ``rewards``.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (n_groups, G) with G >= 2, got {tuple(rewards.shape)}")
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    r = rewards if rewards.is_floating_point() else rewards.float()
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "std":
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    equal = (r == r[:, :1]).all(dim=1, keepdim=True)
    return centred.masked_fill(equal, 0.0)


def equal_reward_groups(rewards: torch.Tensor) -> int:
    """How many groups (rows of (n_groups, G) ``rewards``) have all rewards equal: they carry no policy gradient
    (DAPO's dynamic sampling drops and resamples them). Reads the count back to the host."""
    return int((rewards == rewards[:, :1]).all(dim=1).sum())


# --- log-probabilities ---------------------------------------------------------------------------------------

class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits)[token] without materialising the (B, T, V) float32 log-softmax.

    Forward keeps only the logits (in their own dtype; the head's matmul does not save its output) and a float32
    logsumexp per position; backward recomputes softmax one sequence at a time:
    d logp / d logits = onehot(token) - softmax(logits).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)  # float64 stays float64 (gradcheck)
        lse = torch.empty(tokens.shape, dtype=dtype, device=logits.device)
        chosen = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).to(dtype)
        for b in range(logits.shape[0]):  # one (T, V) float32 copy at a time
            lse[b] = torch.logsumexp(logits[b].to(dtype), dim=-1)
        ctx.save_for_backward(logits, tokens, lse)
        return chosen - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, tokens, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for b in range(logits.shape[0]):
            g = grad[b].to(lse.dtype).unsqueeze(-1)
            row = -(logits[b].to(lse.dtype) - lse[b].unsqueeze(-1)).exp() * g
            row.scatter_add_(-1, tokens[b].unsqueeze(-1), g)
            out[b] = row.to(out.dtype)
        return out, None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) float32 ``log pi(tokens[b, t] | ...)`` from (B, T, V) ``logits`` (any float dtype; float64 stays).

    ``logits[:, t]`` must be the prediction of ``tokens[:, t]`` (the caller shifts). Differentiable wrt
    ``logits``; peak extra memory is one sequence's (T, V) float32, and backward saves the logits in their own
    dtype plus a float32 logsumexp per position (``log_softmax().gather()`` would keep a (B, T, V) float32).
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"logits (B, T, V) and tokens (B, T) expected, got {tuple(logits.shape)}, "
                         f"{tuple(tokens.shape)}")
    return _TokenLogprobs.apply(logits, tokens.long())


# --- the loss ------------------------------------------------------------------------------------------------

def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, eps_low: float = EPS, eps_high: float | None = None,
              beta: float = BETA, norm: Norm = "sequence", max_len: int | None = None,
              denominator: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss (minus the objective of DeepSeekMath eq. 3) and detached statistics.

    Arguments, B sequences of T completion positions:

    * ``logp`` (B, T): log pi_theta of the sampled tokens (with grad; :func:`token_logprobs`).
    * ``old_logp`` (B, T): log pi_old, the policy that sampled (detached here). With one update per rollout
      (DeepSeekMath) it equals ``logp.detach()``: rho = 1 but the gradient is still A * grad logp.
    * ``ref_logp`` (B, T) or ``None``: log pi_ref; ``None`` or ``beta == 0`` drops the KL term.
    * ``advantages`` (B,): A_i of each sequence (:func:`group_advantages`, flattened), the same for its tokens.
    * ``mask`` (B, T) bool: the completion tokens that count (not the prompt, not padding after EOS).

    Per token: ``rho = exp(logp - old_logp)``; surrogate ``min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)``
    (``eps_high`` defaults to ``eps_low``; DAPO's clip-higher sets it apart); KL (k3 estimator, eq. 4)
    ``exp(ref - logp) - (ref - logp) - 1 >= 0``; objective ``surrogate - beta * KL``. The loss is minus the
    objective summed over masked tokens and divided according to ``norm``:

    * ``"sequence"`` (DeepSeekMath eq. 3): ``-1/B sum_i 1/|o_i| sum_t``; the denominator is B.
    * ``"token"`` (DAPO): ``-sum_i sum_t / sum_i |o_i|``; the denominator is the token count.
    * ``"constant"`` (Dr. GRPO): ``-sum_i sum_t / (B * max_len)``; the denominator is ``B * max_len``.

    Gradient accumulation: ``denominator`` replaces the computed one (B, the token count, or ``B * max_len``)
    by the full batch's, so that the losses of micro-batches, each computed with the same ``denominator``, sum to
    the full-batch loss (and their gradients to its gradient). Without it every micro-batch is normalised
    alone: "token" then weighs micro-batches equally rather than tokens. For "sequence" pass the number of
    sequences of the whole batch (1/|o_i| is always the sequence's own length); for "token" the number of
    masked tokens of the whole batch (under data parallelism: summed over ranks, with the gradients then
    summed, not averaged).

    ``stats`` holds detached 0-d tensors, means over this call's masked tokens (the caller reads them once,
    e.g. after accumulating, to avoid a host sync per micro-batch): ``kl`` (0 without ``ref_logp``),
    ``clip_fraction`` (tokens where the clipped term is the smaller one, so its gradient is zero: rho above
    1 + eps_high with A > 0, or below 1 - eps_low with A < 0), ``ratio`` (mean rho), ``tokens`` (the count).
    """
    if eps_high is None:
        eps_high = eps_low
    if norm not in ("sequence", "token", "constant"):
        raise ValueError(f"norm must be 'sequence', 'token' or 'constant', got {norm!r}")
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape \
            or (ref_logp is not None and ref_logp.shape != logp.shape) or advantages.shape != logp.shape[:1]:
        raise ValueError("logp, old_logp, ref_logp, mask must be (B, T) and advantages (B,); got "
                         f"{tuple(logp.shape)}, {tuple(old_logp.shape)}, "
                         f"{None if ref_logp is None else tuple(ref_logp.shape)}, {tuple(mask.shape)}, "
                         f"{tuple(advantages.shape)}")
    if norm == "constant" and denominator is None and max_len is None:
        raise ValueError("norm='constant' needs max_len (or a denominator)")
    mask = mask.bool()
    logp = logp.float()
    adv = advantages.detach().float().unsqueeze(1)
    # Masked positions may hold anything (padding logits): zero the log-ratios there, before exp, so that no inf
    # or nan reaches the sum or its gradient.
    log_ratio = torch.where(mask, logp - old_logp.detach().float(), 0.0)
    ratio = log_ratio.exp()
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    objective = torch.minimum(unclipped, clipped)
    if ref_logp is not None:
        delta = torch.where(mask, ref_logp.detach().float() - logp, 0.0)
        kl = delta.exp() - delta - 1.0
        if beta:
            objective = objective - beta * kl
    objective = torch.where(mask, objective, 0.0)

    n_seq = logp.shape[0]
    if norm == "sequence":
        # Each sequence's own token mean (an empty sequence contributes 0), then the mean over sequences.
        per_seq = objective.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        loss = -per_seq.sum() / (n_seq if denominator is None else denominator)
    else:
        total = objective.sum()
        if denominator is None:
            denominator = mask.sum().clamp(min=1) if norm == "token" else n_seq * max_len
        loss = -total / denominator

    with torch.no_grad():
        count = mask.sum()
        n = count.clamp(min=1).float()
        is_clipped = ((ratio > 1.0 + eps_high) & (adv > 0)) | ((ratio < 1.0 - eps_low) & (adv < 0))
        stats = {
            "kl": (kl * mask).sum() / n if ref_logp is not None else torch.zeros((), device=logp.device),
            "clip_fraction": (is_clipped & mask).sum() / n,
            "ratio": (ratio * mask).sum() / n,
            "tokens": count,
        }
    return loss, stats

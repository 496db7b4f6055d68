"""GRPO's math against numbers computed by hand / in plain Python (posttrain/grpo_loss.py)."""

import math

import pytest
import torch

from dsv3.posttrain.grpo_loss import (DAPO, DEEPSEEKMATH, equal_reward_groups, group_advantages, grpo_loss,
                                      token_logprobs)

# Two groups of G = 3 outputs, T = 4 completion positions; rows 0-2 are group 0, rows 3-5 group 1.
REWARDS = [[1.0, 0.0, 0.5], [0.0, 0.0, 1.0]]
# group 0: mean 0.5, deviations (0.5, -0.5, 0), sample std sqrt(0.5 / 2) = 0.5
# group 1: mean 1/3, deviations (-1/3, -1/3, 2/3), sample std sqrt((1/9 + 1/9 + 4/9) / 2) = sqrt(1/3)
A0 = 0.5 / (0.5 + 1e-4)
A1 = (1 / 3) / (math.sqrt(1 / 3) + 1e-4)
ADV = [A0, -A0, 0.0, -A1, -A1, 2 * A1]
MASK = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]  # 17 tokens
L15, L05 = math.log(1.5), math.log(0.5)
# log rho = logp - old_logp; 100 at masked positions (exp would overflow float32 if it were not masked first).
LOG_RATIO = [[L15, 0.1, -0.5, 100.0],   # A > 0: rho 1.5 is clipped (takes 1.2 A); 0.61 is not
             [L05, L15, 100.0, 100.0],  # A < 0: rho 0.5 is clipped (takes 0.8 A); 1.5 is not
             [0.3, -0.3, 0.0, 0.2],     # A = 0: nothing
             [0.05, 100.0, 100.0, 100.0],
             [-0.4, 0.0, 0.1, -0.1],    # A < 0: rho 0.67 is clipped
             [0.22, 0.0, -0.2, 100.0]]  # A > 0: rho 1.25 is clipped (not by DAPO's 1.28)
CLIPPED = 4
OLD = [[-1.0 - 0.1 * t - 0.05 * i for t in range(4)] for i in range(6)]
LOGP = [[OLD[i][t] + LOG_RATIO[i][t] for t in range(4)] for i in range(6)]
REF = [[LOGP[i][t] + 0.1 * ((i + t) % 3 - 1) for t in range(4)] for i in range(6)]


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def plain_objective(beta, eps_low=0.2, eps_high=0.2):
    """Per-token objective, in plain Python, of the example."""
    out = []
    for i in range(6):
        row = []
        for j in range(4):
            rho, a = math.exp(LOG_RATIO[i][j]) if MASK[i][j] else 1.0, ADV[i]
            surrogate = min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
            d = REF[i][j] - LOGP[i][j]
            row.append((surrogate - beta * (math.exp(d) - d - 1)) * MASK[i][j])
        out.append(row)
    return out


def test_advantages_by_hand():
    adv = group_advantages(t(REWARDS))
    assert adv.flatten().tolist() == pytest.approx(ADV, rel=1e-6)
    none = group_advantages(t(REWARDS), scale="none")
    assert none.flatten().tolist() == pytest.approx([0.5, -0.5, 0.0, -1 / 3, -1 / 3, 2 / 3], rel=1e-6)
    with pytest.raises(ValueError):
        group_advantages(t([[1.0], [0.0]]))


def test_equal_rewards_give_exactly_zero_and_no_gradient():
    rewards = t([[0.1, 0.1, 0.1], [0.7, 0.7, 0.7], [1.0, 0.0, 1.0]])
    adv = group_advantages(rewards)
    assert (adv[:2] == 0).all() and (adv[2] != 0).all()
    assert (group_advantages(rewards, scale="none")[:2] == 0).all()
    assert equal_reward_groups(rewards) == 2
    logp = torch.randn(6, 5, requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), None, adv[:2].flatten(), torch.ones(6, 5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and (logp.grad == 0).all()


def test_surrogate_kl_and_normalisations_by_hand():
    beta = 0.04
    obj = plain_objective(beta)
    # Spot checks of single tokens, by hand: a clipped one, an unclipped one, and their k3 KL.
    d00 = REF[0][0] - LOGP[0][0]  # (0 + 0) % 3 - 1 = -1: d = -0.1
    assert obj[0][0] == pytest.approx(1.2 * A0 - beta * (math.exp(-0.1) + 0.1 - 1))
    assert d00 == pytest.approx(-0.1)
    assert obj[1][1] == pytest.approx(1.5 * -A0 - beta * (math.exp(0.1) - 0.1 - 1))  # d = (1+1)%3-1 = 1 -> 0.1
    assert obj[1][0] == pytest.approx(0.8 * -A0)  # d = (1+0)%3-1 = 0: no KL

    lengths = [sum(m) for m in MASK]
    per_seq = [sum(row) / n for row, n in zip(obj, lengths)]
    expected = {
        "sequence": -sum(per_seq) / 6,
        "token": -sum(map(sum, obj)) / 17,
        "constant": -sum(map(sum, obj)) / (6 * 8),
    }
    args = (t(LOGP), t(OLD), t(REF), t(ADV), t(MASK, torch.bool))
    for norm, value in expected.items():
        loss, stats = grpo_loss(*args, beta=beta, norm=norm, max_len=8)
        assert loss.item() == pytest.approx(value, rel=1e-5), norm
    kl = sum((math.exp(REF[i][j] - LOGP[i][j]) - (REF[i][j] - LOGP[i][j]) - 1) * MASK[i][j]
             for i in range(6) for j in range(4)) / 17
    ratio = sum(math.exp(LOG_RATIO[i][j]) * MASK[i][j] for i in range(6) for j in range(4)) / 17
    assert stats["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert stats["ratio"].item() == pytest.approx(ratio, rel=1e-5)
    assert stats["clip_fraction"].item() == pytest.approx(CLIPPED / 17)
    assert stats["tokens"].item() == 17
    assert all(not v.requires_grad for v in stats.values())


def test_clip_higher_and_no_kl():
    # eps_high 0.28 (DAPO): row 5's rho 1.246 stays inside the band, row 0's 1.5 does not.
    args = (t(LOGP), t(OLD), t(REF), t(ADV), t(MASK, torch.bool))
    loss, stats = grpo_loss(*args, eps_high=DAPO.eps_high, beta=0.0, norm="token")
    assert loss.item() == pytest.approx(-sum(map(sum, plain_objective(0.0, 0.2, 0.28))) / 17, rel=1e-5)
    assert stats["clip_fraction"].item() == pytest.approx((CLIPPED - 1) / 17)
    no_ref, stats = grpo_loss(t(LOGP), t(OLD), None, t(ADV), t(MASK, torch.bool), eps_high=0.28, norm="token")
    assert no_ref.item() == pytest.approx(loss.item()) and stats["kl"].item() == 0


def test_on_policy_identity():
    # One update per rollout (old = logp.detach()): rho = 1, KL = 0, and the gradient is -A_i / N per token.
    logp = torch.randn(4, 6, requires_grad=True)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0])
    loss, stats = grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, norm="token")
    assert stats["kl"].item() == 0 and stats["ratio"].item() == pytest.approx(1.0)
    assert stats["clip_fraction"].item() == 0
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv[:, None].expand(4, 6) * mask / mask.sum())


@pytest.mark.parametrize("norm", ["token", "sequence"])
def test_gradient_unclipped_matches_analytic(norm):
    # Log-ratios within (log 0.8, log 1.2): nothing clipped, so d(-obj)/d logp = -(rho A + beta (e^(ref-logp) - 1)).
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(6, 4, generator=g) - 0.5
    lr = (torch.rand(6, 4, generator=g) - 0.5) * 0.3
    ref = old + (torch.rand(6, 4, generator=g) - 0.5) * 0.4
    logp = (old + lr).requires_grad_()
    beta = 0.04
    loss, stats = grpo_loss(logp, old, ref, t(ADV), t(MASK, torch.bool), beta=beta, norm=norm)
    loss.backward()
    assert stats["clip_fraction"].item() == 0
    for i in range(6):
        for j in range(4):
            lp, o, r = logp[i, j].item(), old[i, j].item(), ref[i, j].item()
            dobj = math.exp(lp - o) * ADV[i] + beta * (math.exp(r - lp) - 1)
            scale = 17 if norm == "token" else 6 * sum(MASK[i])
            expected = -dobj / scale if MASK[i][j] else 0.0
            assert logp.grad[i, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-8), (i, j)


@pytest.mark.parametrize("norm", ["token", "sequence", "constant"])
def test_micro_batches_with_global_denominator_sum_to_full_batch(norm):
    args = [t(LOGP), t(OLD), t(REF), t(ADV), t(MASK, torch.bool)]
    full_logp = args[0].clone().requires_grad_()
    full, _ = grpo_loss(full_logp, *args[1:], norm=norm, max_len=8)
    full.backward()
    denominator = {"token": 17, "sequence": 6, "constant": 6 * 8}[norm]
    total, grads = 0.0, []
    for rows in (slice(0, 2), slice(2, 6)):  # unequal micro-batches
        part = args[0][rows].clone().requires_grad_()
        loss, _ = grpo_loss(part, *(a[rows] for a in args[1:]), norm=norm, denominator=denominator)
        loss.backward()
        total += loss.item()
        grads.append(part.grad)
    assert total == pytest.approx(full.item(), rel=1e-6)
    torch.testing.assert_close(torch.cat(grads), full_logp.grad)


def test_presets_are_the_sources_numbers():
    assert (DEEPSEEKMATH.beta, DEEPSEEKMATH.eps_low, DEEPSEEKMATH.norm) == (0.04, 0.2, "sequence")
    assert (DAPO.eps_low, DAPO.eps_high, DAPO.norm) == (0.2, 0.28, "token")


def test_bad_arguments():
    x, m = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="max_len"):
        grpo_loss(x, x, None, torch.zeros(2), m, norm="constant")
    with pytest.raises(ValueError, match="norm"):
        grpo_loss(x, x, None, torch.zeros(2), m, norm="mean")
    with pytest.raises(ValueError):
        grpo_loss(x, x, None, torch.zeros(3), m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_match_log_softmax(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=g) * 3).to(dtype).requires_grad_()
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    out = token_logprobs(logits, tokens)
    assert out.dtype == torch.float32
    ref_logits = logits.detach().float().requires_grad_()
    ref = ref_logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(3, 5, generator=g)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad, rtol=tol, atol=tol)


def test_token_logprobs_gradcheck():
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 4, (2, 3))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, tokens), (logits,))

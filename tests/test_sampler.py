"""The batched device sampler (dsv3.inference.sampler) against the per-row references of sampling.py.

The noise is counter-based, so every statistical test below is deterministic: the tolerances are stated in
standard deviations of the empirical frequencies, and a pass does not depend on luck at each run.
"""

import math

import pytest
import torch

from dsv3.inference.sampler import SamplingTensors, needs_filter, probs, sample, uniform, verify, verify_greedy
from dsv3.inference.sampling import SamplingParams, token_probs

PARAMS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=4),
    SamplingParams(temperature=1.0, top_p=0.6),
    SamplingParams(temperature=0.9, top_k=6, top_p=0.8),
    SamplingParams(temperature=1.0, top_k=1),  # greedy
    SamplingParams(temperature=2.0, top_k=100, top_p=1.0),  # top_k >= V: off
]


def logits_for(rows: int, v: int, seed: int, *shape: int) -> torch.Tensor:
    return 2 * torch.randn(rows, *shape, v, generator=torch.Generator().manual_seed(seed))


def assert_frequencies(tokens: torch.Tensor, p: torch.Tensor, sigmas: float = 4.5) -> None:
    """Empirical frequencies of ``tokens`` (N,) within ``sigmas`` standard deviations of p (V,) in every
    cell; tokens of probability 0 never occur."""
    n = tokens.numel()
    freq = torch.bincount(tokens.flatten(), minlength=p.numel()).double() / n
    p = p.double()
    tol = sigmas * (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= tol).all(), (freq, p)


def test_needs_filter() -> None:
    assert not needs_filter([SamplingParams(temperature=0.5), SamplingParams(temperature=0, top_p=0.5)])
    assert not needs_filter([SamplingParams(top_k=1)])  # greedy
    assert needs_filter([SamplingParams(temperature=0.5), SamplingParams(top_k=5)])
    assert needs_filter([SamplingParams(top_p=0.9)])


def test_from_params_padding_and_copy() -> None:
    t = SamplingTensors.from_params(PARAMS[:3] + PARAMS[5:6], [1, 2**64 - 1, 3, 4], size=6)
    assert t.temperature.dtype == t.top_p.dtype == torch.float32
    assert t.top_k.dtype == t.seed.dtype == torch.int64
    assert t.temperature.tolist() == pytest.approx([0, 0.7, 1.3, 0, 0, 0])  # top_k=1 and padding: greedy
    assert t.top_k.tolist() == [0, 0, 4, 1, 0, 0]
    assert t.top_p.tolist() == [1] * 6
    assert t.seed.tolist() == [1, -1, 3, 4, 0, 0]  # an unsigned 64-bit seed keeps its bits
    buffers = SamplingTensors.from_params([], [], size=6)
    assert buffers.copy_(t) is buffers and all(torch.equal(getattr(buffers, f), getattr(t, f))
                                               for f in ("temperature", "top_k", "top_p", "seed"))
    with pytest.raises(ValueError):
        SamplingTensors.from_params(PARAMS[:2], [1])
    with pytest.raises(ValueError):
        SamplingTensors.from_params(PARAMS[:2], [1, 2], size=1)


# ----------------------------------------------------------------------------------------------------
# counter-based noise

def test_uniform_statistics() -> None:
    seed = torch.arange(64) * 7919 - 3
    offset = torch.arange(64 * 400).view(64, 400)
    u = uniform(seed, offset, 16, salt=5)
    assert u.shape == (64, 400, 16) and u.dtype == torch.float32
    assert 0 < u.min() and u.max() < 1
    x = u.double().flatten()
    n = x.numel()  # 409,600 draws
    assert abs(x.mean() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert abs(x.var() - 1 / 12) < 4 * math.sqrt(1 / 180 / n)  # Var of (U - 1/2)^2 is 1/180
    ks = ((torch.arange(1, n + 1, dtype=torch.float64) / n) - x.sort().values).abs().max()
    assert ks < 1.95 / math.sqrt(n)  # Kolmogorov-Smirnov at the 0.1% level
    counts = torch.bincount((x * 100).long(), minlength=100).double()
    chi2 = ((counts - n / 100) ** 2 / (n / 100)).sum()
    assert chi2 < 148  # chi-square, 99 degrees of freedom, 0.1% level
    # neighbours (columns, offsets, seeds) are uncorrelated
    c = u - 0.5
    for a, b in ((c[..., 1:], c[..., :-1]), (c[:, 1:], c[:, :-1]), (c[1:], c[:-1])):
        corr = (a * b).mean() / (c * c).mean()
        assert abs(corr) < 4 / math.sqrt(a.numel())


def test_uniform_is_counter_based() -> None:
    seed = torch.tensor([11, 22, 33, -4])
    offset = torch.tensor([[0, 1, 2], [5, 6, 7], [0, 1, 2], [9, 2**40, -3]])
    u = uniform(seed, offset, 8, salt=1)
    # any row order and batch, (B,) or (B, S) offsets, fewer columns: the same values
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(uniform(seed[perm], offset[perm], 8, salt=1), u[perm])
    assert torch.equal(uniform(seed[1:2], offset[1:2, 2], 8, salt=1), u[1:2, 2])
    assert torch.equal(uniform(seed, offset, 3, salt=1), u[..., :3])
    # seed, offset, salt and column all matter
    assert (u[0] != u[2]).all() and (uniform(seed, offset, 8, salt=2) != u).all()
    assert (u[0, 0] != u[0, 1]).all() and u[0, 0].unique().numel() == 8
    assert (uniform(torch.tensor([0]), torch.tensor([0]), 4) > 0).all()  # no degenerate zero state


# ----------------------------------------------------------------------------------------------------
# sampling

def test_probs_matches_token_probs() -> None:
    t = SamplingTensors.from_params(PARAMS, list(range(len(PARAMS))))
    for shape in ((), (3,)):
        logits = logits_for(len(PARAMS), 12, 0, *shape)
        p = probs(logits, t)
        for i, params in enumerate(PARAMS):
            assert torch.allclose(p[i], token_probs(logits[i], params), atol=1e-6, rtol=0), params
    logits = logits_for(len(PARAMS), 12, 1).bfloat16()
    p = probs(logits, t)
    for i, params in enumerate(PARAMS):
        assert torch.allclose(p[i], token_probs(logits[i], params), atol=1e-6, rtol=0), params


def test_sample_greedy_support_and_frequencies() -> None:
    n, v = 20_000, 10
    t = SamplingTensors.from_params(PARAMS, [7] * len(PARAMS))
    logits = logits_for(len(PARAMS), v, 2)
    offset = torch.arange(len(PARAMS) * n).view(len(PARAMS), n)
    tokens = sample(logits[:, None].expand(-1, n, -1), t, offset)  # one row, 20,000 positions
    assert tokens.shape == (len(PARAMS), n) and tokens.dtype == torch.int64
    for i, params in enumerate(PARAMS):
        p = token_probs(logits[i], params)
        if params.greedy:
            assert (tokens[i] == logits[i].argmax()).all()
        assert_frequencies(tokens[i], p)  # includes: never a token outside the top-k / top-p set


def test_sample_reproducible_in_any_batch() -> None:
    v = 16
    logits = logits_for(len(PARAMS), v, 3, 5)
    seeds = [100 + i for i in range(len(PARAMS))]
    offset = torch.arange(5) + 10 * torch.arange(len(PARAMS))[:, None]
    tokens = sample(logits, SamplingTensors.from_params(PARAMS, seeds), offset)
    # the reverse order, with two more rows in front: each row's tokens are the same
    extra = [SamplingParams(temperature=1.5), SamplingParams(top_p=0.3)]
    order = list(range(len(PARAMS)))[::-1]
    t2 = SamplingTensors.from_params(extra + [PARAMS[i] for i in order], [5, 6] + [seeds[i] for i in order])
    logits2 = torch.cat([logits_for(2, v, 4, 5), logits[order]])
    tokens2 = sample(logits2, t2, torch.cat([offset[:2], offset[order]]))
    assert torch.equal(tokens2[2:], tokens[order])
    # one position at a time ((B, V) logits, (B,) offsets) is the same as (B, S, V)
    for s in range(5):
        assert torch.equal(sample(logits[:, s], SamplingTensors.from_params(PARAMS, seeds), offset[:, s]),
                           tokens[:, s])
    # another seed gives other tokens
    n = 2000
    flat = logits_for(1, v, 5).expand(n, -1)
    a = sample(flat, SamplingTensors.from_params([PARAMS[1]] * n, [1] * n), torch.arange(n))
    b = sample(flat, SamplingTensors.from_params([PARAMS[1]] * n, [2] * n), torch.arange(n))
    assert (a != b).float().mean() > 0.3


def test_unfiltered_equals_filtered() -> None:
    params = [p for p in PARAMS if not needs_filter([p])]
    t = SamplingTensors.from_params(params, list(range(len(params))))
    logits = logits_for(len(params), 20, 6, 50)
    offset = torch.arange(50).expand(len(params), -1)
    assert torch.equal(sample(logits, t, offset, filtered=False), sample(logits, t, offset))
    assert torch.allclose(probs(logits, t, filtered=False), probs(logits, t), atol=1e-7, rtol=0)


# ----------------------------------------------------------------------------------------------------
# speculative verification

def test_verify_greedy_is_greedy_decoding() -> None:
    b, k, v = 6, 3, 9
    target = logits_for(b, v, 7, k + 1)
    argmax = target.argmax(-1)
    drafts = argmax[:, :k].clone()
    first_miss = torch.tensor([0, 1, 2, 3, 3, 1])  # 3 = every draft matches
    for row, j in enumerate(first_miss.tolist()):
        if j < k:
            drafts[row, j] = (drafts[row, j] + 1) % v
        if j + 1 < k:
            drafts[row, j + 1:] = torch.randint(0, v, (k - j - 1,))  # later drafts don't matter
    t = SamplingTensors.from_params([SamplingParams(temperature=0)] * b, list(range(b)))
    soft = torch.softmax(torch.randn(b, k, v), -1)  # a greedy row ignores q
    for q in (None, soft, "greedy path"):
        accepted, tokens = verify_greedy(target, drafts) if isinstance(q, str) else \
            verify(target, drafts, q, t, torch.arange(b) * 100)
        assert torch.equal(accepted, first_miss)
        for row, a in enumerate(first_miss.tolist()):
            assert torch.equal(tokens[row, :a], argmax[row, :a])  # = the accepted drafts
            assert (tokens[row, a:] == argmax[row, a]).all()  # correction or bonus, repeated after it


def draft_setup(n: int, v: int, k: int, params: SamplingParams, greedy_draft: bool, target_seed: int = 8):
    """n independent rows of one request (same seed, disjoint positions): target logits that don't depend on
    the earlier tokens, drafts drawn from draft logits by ``sample`` (salt 1), and their distributions."""
    target = logits_for(1, v, target_seed, k + 1).expand(n, -1, -1)
    draft_logits = logits_for(1, v, 9, k).expand(n, -1, -1)
    t = SamplingTensors.from_params([params] * n, [42] * n)
    offset = torch.arange(n) * (k + 1)
    positions = offset[:, None] + torch.arange(k)
    q_params = SamplingParams(temperature=0) if greedy_draft else SamplingParams(temperature=1.2, top_k=v - 1)
    tq = SamplingTensors.from_params([q_params] * n, [42] * n)
    drafts = sample(draft_logits, tq, positions, salt=1)
    q = None if greedy_draft else probs(draft_logits, tq)
    return target, drafts, q, t, offset


@pytest.mark.parametrize("greedy_draft", [False, True])
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=0.8, top_k=7, top_p=0.9)])
def test_verify_first_token_is_distributed_as_p(params: SamplingParams, greedy_draft: bool) -> None:
    n, v, k = 20_000, 8, 1
    target, drafts, q, t, offset = draft_setup(n, v, k, params, greedy_draft)
    accepted, tokens = verify(target, drafts, q, t, offset)
    assert 0 < accepted.float().mean() < 1  # non-trivial: both branches are taken
    assert_frequencies(tokens[:, 0], token_probs(target[0, 0], params))
    bonus = tokens[accepted == 1, 1]
    assert_frequencies(bonus, token_probs(target[0, 1], params))


@pytest.mark.parametrize("greedy_draft", [False, True])
def test_verify_two_drafts_joint(greedy_draft: bool) -> None:
    """k = 2: the first two emitted tokens (the second from the next step when only one came out here) are
    jointly distributed as p_0(x) p_1(y); the target at position 1 doesn't depend on x in this setup."""
    n, v, k = 40_000, 6, 2
    params = SamplingParams(temperature=1.5, top_p=0.9)
    target, drafts, q, t, offset = draft_setup(n, v, k, params, greedy_draft, target_seed=20)
    accepted, tokens = verify(target, drafts, q, t, offset)
    assert torch.bincount(accepted, minlength=3).min() > 0
    next_step = sample(target[:, 1], t, offset + 1)
    second = torch.where(accepted >= 1, tokens[:, 1], next_step)
    p0, p1 = token_probs(target[0, 0], params), token_probs(target[0, 1], params)
    assert_frequencies(tokens[:, 0] * v + second, (p0[:, None] * p1[None, :]).flatten())
    third = tokens[accepted == 2, 2]  # the bonus after two accepted drafts
    assert_frequencies(third, token_probs(target[0, 2], params))


# ----------------------------------------------------------------------------------------------------
# compilation and the GPU

def compile_inputs():
    t = SamplingTensors.from_params(PARAMS, list(range(len(PARAMS))))
    logits = logits_for(len(PARAMS), 11, 10)
    offset = torch.arange(len(PARAMS)) * 3
    target = logits_for(len(PARAMS), 11, 11, 3)
    drafts = torch.randint(0, 11, (len(PARAMS), 2), generator=torch.Generator().manual_seed(0))
    q = torch.softmax(logits_for(len(PARAMS), 11, 12, 2), -1)
    return t, logits, offset, target, drafts, q


def test_fullgraph_capture() -> None:
    """No graph break (fullgraph) and the same tokens as eager: dynamo + AOT autograd, no codegen (fast)."""
    t, logits, offset, target, drafts, q = compile_inputs()
    torch._dynamo.reset()
    compiled_sample = torch.compile(sample, fullgraph=True, backend="aot_eager")
    for filtered in (True, False):
        assert torch.equal(compiled_sample(logits, t, offset, filtered), sample(logits, t, offset, filtered))
    compiled_verify = torch.compile(verify, fullgraph=True, backend="aot_eager")
    for draft_probs in (q, None):
        for a, b in zip(compiled_verify(target, drafts, draft_probs, t, offset),
                        verify(target, drafts, draft_probs, t, offset)):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_inductor_compile() -> None:
    """torch.compile with inductor on CPU (about a minute cold on two cores; seconds with a warm cache)."""
    t, logits, offset, *_ = compile_inputs()
    torch._dynamo.reset()
    assert torch.equal(torch.compile(sample, fullgraph=True)(logits, t, offset), sample(logits, t, offset))


@pytest.mark.gpu
def test_cuda_matches_cpu_without_syncs() -> None:
    t, logits, offset, target, drafts, q = compile_inputs()
    n = 4096
    many = logits_for(1, 11, 13).expand(n, -1)
    t_many = SamplingTensors.from_params([PARAMS[4]] * n, [3] * n)
    cpu = [sample(logits, t, offset), sample(many, t_many, torch.arange(n)),
           *verify(target, drafts, q, t, offset), *verify(target, drafts, None, t, offset),
           uniform(t_many.seed, torch.arange(n), 11, salt=9)]
    dev = torch.device("cuda")
    inputs = [x.to(dev) for x in (logits, offset, target, drafts, q, many)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tc = SamplingTensors.from_params(PARAMS, list(range(len(PARAMS))), device=dev)
        tc_many = SamplingTensors.from_params([PARAMS[4]] * n, [3] * n, device=dev)
        logits_c, offset_c, target_c, drafts_c, q_c, many_c = inputs
        gpu = [sample(logits_c, tc, offset_c), sample(many_c, tc_many, torch.arange(n, device=dev)),
               *verify(target_c, drafts_c, q_c, tc, offset_c), *verify(target_c, drafts_c, None, tc, offset_c),
               uniform(tc_many.seed, torch.arange(n, device=dev), 11, salt=9)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())  # the noise bit for bit, and the tokens

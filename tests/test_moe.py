"""Gate and MoE unit tests (report §2.1.2)."""

import pytest
import torch

import dsv3
from dsv3.config import preset
from dsv3.model import Gate, MoE, combine, dispatch


def make_gate(**changes) -> Gate:
    gate = Gate(preset("tiny").replace(**changes))
    torch.nn.init.normal_(gate.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    return gate


def test_bias_changes_choice_not_gate_values():
    gate = make_gate(n_group=1, topk_group=1)
    x = torch.randn(64, gate.weight.shape[1], generator=torch.Generator().manual_seed(1))
    w0, idx0, scores = gate(x)
    gate.e_score_correction_bias[idx0[0, 0]] = -10.0  # make token 0's first choice unattractive
    w1, idx1, scores1 = gate(x)
    assert torch.equal(scores, scores1)  # affinities do not see the bias
    assert idx0[0, 0] not in idx1[0]
    # gate values are the unbiased affinities of the chosen experts, normalised, times the route scale
    expected = scores.gather(1, idx1)
    expected = expected / expected.sum(-1, keepdim=True) * gate.route_scale
    torch.testing.assert_close(w1, expected)
    assert torch.allclose(w1.sum(-1), torch.full((64,), gate.route_scale))


def test_experts_outside_kept_groups_never_chosen():
    gate = make_gate()  # 16 experts, 4 groups of 4, keep 2 groups
    torch.manual_seed(0)
    gate.e_score_correction_bias.normal_(0, 0.2)
    x = torch.randn(512, gate.weight.shape[1])
    _, idx, scores = gate(x)
    biased = (scores + gate.e_score_correction_bias).view(-1, 4, 4)
    group_score = biased.topk(2, dim=-1).values.sum(-1)
    kept = group_score.topk(2, dim=-1).indices
    chosen_groups = idx // 4
    for t in range(x.shape[0]):
        assert set(chosen_groups[t].tolist()) <= set(kept[t].tolist())
    # routing is really limited: each token uses at most 2 groups although it has 4 experts
    assert max(len(set(g.tolist())) for g in chosen_groups) <= 2


def test_group_limited_routing_hand_computed():
    """Equal affinities (zero router weights), so only the bias decides. Group score = sum of the group's top-2
    biased affinities: groups 1 (1.2 + 1.0) and 3 (1.08 + 1.07) beat 0 (1.5 + 0.5) and 2 (1.4 + 0.5), so the best
    single experts 0 and 8 are never chosen; gate values ignore the bias: 0.5 each, normalised, times 2.5."""
    gate = make_gate()  # 16 experts, 4 groups of 4, keep 2, top-4
    torch.nn.init.zeros_(gate.weight)
    gate.e_score_correction_bias.copy_(torch.tensor(
        [1.0, 0, 0, 0, 0.6, 0.6, 0, 0, 0.9, 0, 0, 0, 0.58, 0.57, 0.56, 0.55]))
    w, idx, scores = gate(torch.randn(3, gate.weight.shape[1]))
    assert idx.sort(dim=-1).values.tolist() == [[4, 5, 12, 13]] * 3
    torch.testing.assert_close(scores, torch.full((3, 16), 0.5))
    torch.testing.assert_close(w, torch.full((3, 4), 2.5 / 4))
    # without the group limit the two best experts win
    gate.topk_groups = 4
    assert gate(torch.randn(1, gate.weight.shape[1]))[1].sort(dim=-1).values.tolist() == [[0, 4, 5, 8]]


def test_softmax_scoring_v2():
    gate = make_gate(scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False,
                     routed_scaling_factor=1.0)
    assert gate.e_score_correction_bias is None
    x = torch.randn(32, gate.weight.shape[1])
    w, idx, scores = gate(x)
    torch.testing.assert_close(scores.sum(-1), torch.ones(32))
    torch.testing.assert_close(w, scores.gather(1, idx))


def test_dispatch_combine_equals_dense_reference():
    torch.manual_seed(0)
    config = preset("tiny")
    moe = MoE(config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 9, config.hidden_size)
    y = moe(x)
    # reference: every token through each of its experts one at a time
    flat = x.reshape(-1, config.hidden_size)
    w, idx, _ = moe.gate(flat)
    ref = moe.shared_experts(flat)
    for t in range(flat.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[t, k]
            gate_up = moe.experts.gate_up_proj[e] @ flat[t]
            g, u = gate_up.split(config.moe_intermediate_size)
            ref[t] += w[t, k] * (moe.experts.down_proj[e] @ (torch.nn.functional.silu(g) * u))
    torch.testing.assert_close(y.reshape(-1, config.hidden_size), ref, atol=1e-5, rtol=1e-5)


def test_dispatch_is_sorted_and_combine_inverts():
    x = torch.arange(12.0).view(6, 2)
    idx = torch.tensor([[3, 0], [1, 3], [0, 2], [2, 1], [3, 3 - 3], [1, 2]])
    xs, order, counts = dispatch(x, idx, 4)
    assert counts.tolist() == torch.bincount(idx.flatten(), minlength=4).tolist()
    experts_of_rows = idx.flatten()[order]
    assert torch.all(experts_of_rows[1:] >= experts_of_rows[:-1])
    ones = torch.ones(6, 2)
    torch.testing.assert_close(combine(xs, order, ones), 2 * x)  # each token comes back twice


def test_dispatch_gradient_matches_plain_indexing_and_repeats_bitwise_on_two_threads():
    """dispatch = x[order // K] (the plain reference), with a backward that adds each token's K copies in one
    fixed order: autograd's accumulating index_put_ for the plain form gives other bits from run to run once
    the CPU splits it over threads (here 16,384 copies x 128 wide, past ATen's grain)."""
    g = torch.Generator().manual_seed(0)
    n_tokens, k, d = 4096, 4, 128
    indices = torch.randint(0, 16, (n_tokens, k), generator=g)
    x = torch.randn(n_tokens, d, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(n_tokens * k, d, generator=g, dtype=torch.float64)
    x_sorted, order, _ = dispatch(x, indices, 16)
    (ours,) = torch.autograd.grad(x_sorted, x, grad)
    plain = x[order // k]
    (reference,) = torch.autograd.grad(plain, x, grad)
    assert torch.equal(x_sorted, plain)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        xf = x.detach().float().requires_grad_()
        runs = [torch.autograd.grad(dispatch(xf, indices, 16)[0], xf, grad.float())[0] for _ in range(5)]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.gpu
def test_dispatch_backward_repeats_bitwise_on_cuda():
    """On CUDA dispatch keeps autograd's x[order // K], whose accumulating index_put_ is sorted (deterministic)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n_tokens, k, d = 8192, 6, 2048
    indices = torch.randint(0, 64, (n_tokens, k), generator=g, device="cuda")
    x = torch.randn(n_tokens, d, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(n_tokens * k, d, generator=g, device="cuda", dtype=torch.bfloat16)
    runs = [torch.autograd.grad(dispatch(x, indices, 64)[0], x, grad)[0] for _ in range(5)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_gates_count_the_load_in_training_only():
    model = dsv3.build_model("tiny")
    b, s = 2, 16
    tokens = torch.randint(0, 4096, (b, s))
    model.train()
    model(tokens)
    model(tokens)
    gates = [m.gate for m in model.modules() if isinstance(m, MoE)]
    assert len(gates) == model.config.n_moe_layers + model.config.num_nextn_predict_layers
    main = gates[: model.config.n_moe_layers]  # the MTP block ran no forward (with_mtp=False)
    assert all(g.tokens_per_expert.sum().item() == 2 * b * s * model.config.num_experts_per_tok for g in main)
    for g in gates:
        g.tokens_per_expert.zero_()
    model.eval()
    model(tokens)
    assert all(g.tokens_per_expert.sum().item() == 0 for g in gates)
    assert "tokens_per_expert" not in " ".join(model.state_dict())  # not part of the checkpoint


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_moe_layer_never_waits_for_the_host(fp8):
    """A MoE layer's forward and backward on the GPU (grouped BF16 experts, or the FP8 experts and shared MLP)
    queue their work without a host sync: ``torch.cuda.set_sync_debug_mode("error")`` raises on any call that
    would wait for the GPU (as ``torch.bincount`` did in the dispatch)."""
    from dsv3.fp8 import apply_fp8_training

    cfg = preset("tiny").replace(hidden_size=256, moe_intermediate_size=128, n_routed_experts=16,
                                 num_experts_per_tok=4, n_group=4, topk_group=2)
    torch.manual_seed(0)
    layer = MoE(cfg)
    for p in layer.parameters():  # MoE(cfg) leaves its weights uninitialised (torch.empty: may hold NaN)
        torch.nn.init.normal_(p, std=0.05)
    layer = layer.to("cuda", torch.bfloat16)
    if fp8:
        apply_fp8_training(layer)
    x = torch.randn(2, 128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    from dsv3.model import BalanceLoss

    layer.balance_loss = BalanceLoss("sequence").to("cuda")
    layer.balance_loss.weight.fill_(1e-2)

    def step():
        layer(x).float().square().mean().backward()

    step()  # first calls may synchronise once (kernel compilation, library handles)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None and torch.isfinite(x.grad).all()

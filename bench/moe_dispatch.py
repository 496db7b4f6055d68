"""The MoE token copy of ``dispatch`` on the GPU: the two deterministic backwards, side by side.

``x[order // K]`` copies each token once per chosen expert; autograd's backward of it is an accumulating
``index_put_``, which CUDA runs deterministically (sorted indices) but the CPU does not (threads add in any
order). On the CPU dsv3 therefore puts the copies' gradient back in (token, k) order and sums over k
(``_CopyTokens``). This measures both forms on the GPU, alone and inside a whole MoE layer (bf16, forward +
backward), in one run: the reason dsv3 keeps autograd's form on CUDA.

    python bench/moe_dispatch.py [--tokens 8192] [--shape 16b|v3]
"""

from __future__ import annotations

import argparse

import torch

import dsv3
import dsv3.model.moe as moe_mod
from dsv3.model import MoE


def cuda_ms(fn, reps: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--shape", choices=["16b", "v3"], default="16b")
    args = ap.parse_args()
    config = dsv3.preset("16b" if args.shape == "16b" else "v3-671b")
    if args.shape == "v3":
        config = config.replace(n_routed_experts=32, n_group=1, topk_group=1)  # one EP8 rank's share
    torch.manual_seed(0)
    layer = MoE(config).cuda().to(torch.bfloat16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, args.tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = config.num_experts_per_tok
    flat = x.detach()[0]
    _, indices, _ = layer.gate(flat)
    order = indices.flatten().argsort(stable=True)
    grad_copies = torch.randn(args.tokens * k, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn_like(x)

    rows = []
    saved = moe_mod.copy_tokens
    variants = (("x[order // K]: index_put_ (dsv3 on CUDA)", lambda x, o, k: x[o // k]),
                ("unsort + sum over k (dsv3 on the CPU)", moe_mod._CopyTokens.apply))
    for name, impl in variants:
        moe_mod.copy_tokens = impl
        leaf = flat.clone().requires_grad_()

        def copy_only():
            impl(leaf, order, k).backward(grad_copies)

        def whole_layer():
            y = layer(x)
            y.backward(grad_out)

        grads = []
        for _ in range(3):
            leaf.grad = None
            copy_only()
            grads.append(leaf.grad.clone())
        same = all(torch.equal(grads[0], g) for g in grads[1:])
        rows.append((name, cuda_ms(copy_only), cuda_ms(whole_layer), same))
    moe_mod.copy_tokens = saved
    print(f"MoE dispatch, {args.shape} expert shape, {args.tokens} tokens x top-{k}, bf16, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| copy backward | copy fwd+bwd (ms) | MoE layer fwd+bwd (ms) | layer vs first row | same bits x3 |")
    print("|---|---:|---:|---:|---|")
    for name, copy_ms, layer_ms, same in rows:
        print(f"| {name} | {copy_ms:.3f} | {layer_ms:.3f} | {rows[0][2] / layer_ms:.3f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()

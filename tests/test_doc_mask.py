"""Document-masked attention (report §5.1): the FlexAttention backend against the dense SDPA reference.

On the CPU FlexAttention runs eagerly and has no backward, so the CPU tests compare forwards; gradients are
compared on the GPU (``gpu`` marker)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dsv3
from dsv3.model import doc_mask
from dsv3.model.doc_mask import DocumentMask, document_mask, set_document_attention

from conftest import SRC

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

S = 100  # not a multiple of FlexAttention's 128-token blocks


@pytest.fixture
def backend():
    """Set the process-wide backend for one test, then restore "auto"."""
    yield set_document_attention
    set_document_attention("auto")


@pytest.fixture(scope="module")
def tiny():
    return dsv3.build_model(dsv3.preset("tiny").replace(num_hidden_layers=2), seed=0)


def packed_doc_ids(device="cpu") -> torch.Tensor:
    """Two rows of several documents each, of different lengths (one of a single token)."""
    rows = [[30, 1, 49, 20], [7, 93]]
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows]).to(device)


def run(model, backend_name, tokens, doc_ids, **kw):
    set_document_attention(backend_name)
    with torch.no_grad():
        return model(tokens, doc_ids=doc_ids, with_mtp=True, **kw)


def test_auto_is_sdpa_on_the_cpu_and_the_switch_is_checked(backend):
    assert doc_mask.document_attention("cpu") == "sdpa" and "sdpa" in doc_mask.describe("cpu")
    assert doc_mask.document_attention("cuda") == "flex"
    doc_ids = packed_doc_ids()
    assert DocumentMask.build(doc_ids).dense is not None
    backend("flex")
    mask = DocumentMask.build(doc_ids)
    assert mask.block is not None and mask.dense is None and "flex" in doc_mask.describe("cpu")
    with pytest.raises(ValueError):
        backend("varlen")


def test_block_mask_is_the_dense_mask():
    doc_ids = packed_doc_ids()
    block = doc_mask.block_mask(doc_ids)
    assert block.shape == (2, 1, S, S)
    from torch.nn.attention.flex_attention import create_mask

    dense = create_mask(doc_mask.same_document_causal(doc_ids), 2, None, S, S, device="cpu")
    assert torch.equal(dense, document_mask(doc_ids))


@pytest.mark.parametrize("n", [S, S - 1, 37])
def test_first_n_positions(n):
    doc_ids = packed_doc_ids()
    for name in ("sdpa", "flex"):
        sub = DocumentMask.build(doc_ids, name).first(n)
        assert torch.equal(sub.doc_ids, doc_ids[:, :n])
        if name == "sdpa":
            assert torch.equal(sub.dense, document_mask(doc_ids[:, :n]))
        else:
            assert sub.block.shape == (2, 1, n, n)


@pytest.mark.parametrize("future", [True, False], ids=["future_tokens", "mtp_on_fewer_positions"])
def test_flex_logits_equal_the_dense_reference(tiny, backend, future):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 4096, (2, S), generator=g)
    kw = {"future_tokens": torch.randint(2, 4096, (2, 1), generator=g)} if future else {}
    ref = run(tiny, "sdpa", tokens, packed_doc_ids(), **kw)
    got = run(tiny, "flex", tokens, packed_doc_ids(), **kw)
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert len(got.mtp_logits) == len(ref.mtp_logits) == 1
    assert got.mtp_logits[0].shape[1] == (S if future else S - 1)
    torch.testing.assert_close(got.mtp_logits[0], ref.mtp_logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["sdpa", "flex"])
def test_a_packed_sample_equals_the_sample_alone(tiny, backend, name):
    """RoPE is relative: with the document mask, sample b packed between a and c sees what it sees alone, in the
    main head and in the MTP module (whose window inside b ends one token earlier)."""
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randint(2, 4096, (1, n), generator=g) for n in (29, 45, 26))
    packed = torch.cat([a, b, c], dim=1)
    doc_ids = torch.tensor([[0] * 29 + [1] * 45 + [2] * 26])
    got = run(tiny, name, packed, doc_ids)
    set_document_attention("auto")
    with torch.no_grad():
        alone = tiny(b, with_mtp=True)
    torch.testing.assert_close(got.logits[:, 29:74], alone.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.mtp_logits[0][:, 29:73], alone.mtp_logits[0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        unmasked = tiny(packed).logits
    assert (unmasked[:, 29:74] - alone.logits).abs().max() > 1e-3  # without the mask a leaks into b


def test_flex_on_the_cpu_refuses_to_train_loudly(tiny, backend):
    backend("flex")
    with pytest.raises(NotImplementedError, match="no backward on the CPU"):
        tiny(torch.randint(2, 4096, (2, S)), doc_ids=packed_doc_ids())


def test_bench_smoke():
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = Path(__file__).resolve().parents[1] / "bench" / "doc_mask.py"
    out = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Flex + BlockMask" in out.stdout and "| 256 | SDPA + dense doc mask |" in out.stdout


# ------------------------------------------------------------------------------------------------------
# GPU: compiled FlexAttention


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
def test_gpu_flex_equals_dense_bf16_at_16b_sizes():
    """16b's attention (16 heads, q/k 192, v 128), S = 4096 with 8 documents, bf16: outputs and gradients."""
    torch.manual_seed(0)
    s, h = 4096, 16
    doc_ids = (torch.arange(s, device="cuda") * 8 // s)[None]
    q, k, v = (torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for d in (192, 192, 128))
    scale = 192 ** -0.5
    results = []
    for name in ("sdpa", "flex"):
        mask = DocumentMask.build(doc_ids, name)
        if name == "flex":
            o = doc_mask.flex_attention(q, k, v, mask.block, scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, scale=scale)
        o.backward(torch.ones_like(o))
        results.append([o.detach(), *(t.grad.clone() for t in (q, k, v))])
        q.grad = k.grad = v.grad = None
    for name, got, ref in zip(("out", "dq", "dk", "dv"), *results):
        assert _rel(got, ref) < 1e-2, name


@pytest.mark.gpu
def test_gpu_flex_does_not_materialise_the_mask():
    """At S = 32768 the dense mask alone is S^2 bytes = 1 GiB; the BlockMask build plus a forward and backward
    (2 heads: q, k, v and their gradients ~ 130 MiB) stay far below that."""
    s, h = 32768, 2
    doc_ids = (torch.arange(s, device="cuda") * 8 // s)[None]
    q, k, v = (torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for d in (192, 192, 128))
    doc_mask.flex_attention(q, k, v, DocumentMask.build(doc_ids, "flex").block, 0.07).sum().backward()  # compile
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mask = DocumentMask.build(doc_ids, "flex")
    build_peak = torch.cuda.max_memory_allocated() - base
    doc_mask.flex_attention(q, k, v, mask.block, 0.07).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert build_peak < s * s // 64, build_peak
    assert peak < s * s // 4, peak


@pytest.mark.gpu
def test_gpu_model_backends_agree_in_fp32_incl_gradients(backend):
    """The tiny model in float32 on the GPU, S = 300 (3 blocks, the last partial), with MTP: logits and every
    parameter's gradient equal between the backends; and flex inside a compiled MLA equals it eager."""
    model = dsv3.build_model(dsv3.preset("tiny").replace(num_hidden_layers=2), device="cuda", seed=0)
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(2, 4096, (2, 301), device="cuda", generator=g)
    doc_ids = torch.tensor([[0] * 120 + [1] * 5 + [2] * 175, [0] * 300], device="cuda")
    results = {}
    for name in ("sdpa", "flex"):
        backend(name)
        model.zero_grad(set_to_none=True)
        out = model(tokens[:, :300], future_tokens=tokens[:, 300:], doc_ids=doc_ids, with_mtp=True)
        (out.logits.sum() + out.mtp_logits[0].sum()).backward()
        results[name] = (out.logits.detach(), out.mtp_logits[0].detach(),
                         {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (ref_logits, ref_mtp, ref_grads), (logits, mtp, grads) = results["sdpa"], results["flex"]
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mtp, ref_mtp, atol=1e-4, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        assert _rel(grads[n], ref_grads[n]) < 1e-4, n

    attn = model.layers[0].self_attn
    x = torch.randn(2, 300, attn.o_proj.out_features, device="cuda", requires_grad=True)
    cos, sin = model.rotary(torch.arange(300, device="cuda"))
    mask = DocumentMask.build(doc_ids, "flex")
    outs = []
    for fn in (attn, torch.compile(attn)):
        o = fn(x, cos, sin, mask)
        o.sum().backward()
        outs.append((o.detach(), x.grad))
        x.grad = None
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)

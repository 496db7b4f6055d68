"""Checkpoint layout: FP8 weights, MTP round trip, sharding and clear errors."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv3
from dsv3 import CheckpointError


def tiny_model(**changes):
    config = dsv3.preset("tiny").replace(vocab_size=300, num_hidden_layers=2, **changes)
    return dsv3.build_model(config, seed=5)


def write_fp8_checkpoint(src_dir, dst_dir):
    """Quantise a checkpoint's 2-D projection weights the way the official release stores them: float8_e4m3fn
    plus a float32 weight_scale_inv per 128x128 block (edge blocks ragged). Returns the dequantised values."""
    dst_dir.mkdir()
    index = json.loads((src_dir / "model.safetensors.index.json").read_text())
    expected = {}
    shards = {}
    for name, file in index["weight_map"].items():
        shards.setdefault(file, {})[name] = None
    new_map = {}
    for file in shards:
        tensors = load_file(src_dir / file)
        out = {}
        for name, t in tensors.items():
            if t.dim() == 2 and "proj" in name:  # attention and expert projections, as in the release
                n, k = t.shape
                scale = torch.empty((n + 127) // 128, (k + 127) // 128)
                q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
                deq = torch.empty(n, k)
                for i in range(scale.shape[0]):
                    for j in range(scale.shape[1]):
                        blk = t[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
                        s = blk.abs().max().clamp(min=1e-12) / 448.0
                        qb = (blk / s).to(torch.float8_e4m3fn)
                        q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = qb
                        deq[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = qb.float() * s
                        scale[i, j] = s
                out[name] = q
                out[name + "_scale_inv"] = scale
                new_map[name + "_scale_inv"] = file
                expected[name] = deq
            else:
                out[name] = t
            new_map[name] = file
        save_file(out, dst_dir / file)
    index["weight_map"] = new_map
    (dst_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((src_dir / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    (dst_dir / "config.json").write_text(json.dumps(cfg))
    return expected


def test_fp8_checkpoint_loads_dequantised(tmp_path):
    # hidden 200 and a 300-token vocabulary make ragged 128x128 edge blocks
    model = tiny_model(hidden_size=200, intermediate_size=300)
    dsv3.save_pretrained(model, tmp_path / "bf16", max_shard_size=400_000)
    expected = write_fp8_checkpoint(tmp_path / "bf16", tmp_path / "fp8")
    assert any(e.shape[0] % 128 and e.shape[1] % 128 for e in expected.values())
    loaded = dsv3.load_pretrained(tmp_path / "fp8", dtype=torch.float32)
    got = {hf: (t if idx is None else t[idx]) for hf, _, t, idx in dsv3.checkpoint.hf_tensors(loaded)}
    assert len(expected) > 10
    for name, deq in expected.items():
        torch.testing.assert_close(got[name], deq, atol=0, rtol=0, msg=name)
    # and the quantisation really changed the weights (the test would catch a loader ignoring the scales)
    orig = {hf: (t if idx is None else t[idx]) for hf, _, t, idx in dsv3.checkpoint.hf_tensors(model)}
    name = next(iter(expected))
    assert not torch.equal(orig[name], got[name])
    torch.testing.assert_close(orig[name], got[name], atol=0.05 * orig[name].abs().max().item(), rtol=0.07)


def test_save_load_round_trip_with_mtp_and_shards(tmp_path):
    model = tiny_model()
    for g in model.modules():
        if isinstance(g, dsv3.model.Gate):
            g.e_score_correction_bias.normal_()
    dsv3.save_pretrained(model, tmp_path, max_shard_size=300_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1
    mtp = f"model.layers.{model.config.num_hidden_layers}"
    for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight",
                "mlp.experts.3.up_proj.weight", "mlp.gate.e_score_correction_bias"):
        assert f"{mtp}.{key}" in index["weight_map"], key
    with safe_open(tmp_path / index["weight_map"][f"{mtp}.mlp.gate.e_score_correction_bias"], "pt") as f:
        assert f.get_tensor(f"{mtp}.mlp.gate.e_score_correction_bias").dtype == torch.float32
    loaded = dsv3.load_pretrained(tmp_path, dtype=torch.float32)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    tokens = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        oa = model(tokens, with_mtp=True)
        ob = loaded(tokens, with_mtp=True)
    assert torch.equal(oa.mtp_logits[0], ob.mtp_logits[0])


def _rewrite(tmp_path, edit):
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "model.safetensors" for k in tensors}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.self_attn.o_proj.weight"), "missing.*model.layers.1.self_attn.o_proj.weight"),
    (lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2)), "unexpected.*mlp.extra.weight"),
    (lambda t: t.__setitem__("model.norm.weight", torch.zeros(7)), "model.norm.weight: shape"),
    (lambda t: t.__setitem__("model.layers.1.mlp.experts.2.gate_proj.weight", torch.zeros(3, 3)),
     "experts.2.gate_proj.weight: shape"),
])
def test_bad_checkpoint_errors_name_the_tensor(tmp_path, edit, message):
    dsv3.save_pretrained(tiny_model(), tmp_path)
    _rewrite(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        dsv3.load_pretrained(tmp_path)


def test_missing_directory_and_no_pickle(tmp_path):
    with pytest.raises(FileNotFoundError):
        dsv3.load_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(dsv3.preset("tiny").to_hf_dict()))
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")  # never read: safetensors only
    with pytest.raises(CheckpointError, match="no safetensors"):
        dsv3.load_pretrained(tmp_path)

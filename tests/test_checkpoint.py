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
                "shared_head.head.weight", "embed_tokens.weight", "input_layernorm.weight",
                "post_attention_layernorm.weight", "self_attn.q_a_proj.weight", "self_attn.q_a_layernorm.weight",
                "self_attn.q_b_proj.weight", "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_layernorm.weight",
                "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight", "mlp.gate.weight",
                "mlp.experts.3.gate_proj.weight", "mlp.experts.3.up_proj.weight", "mlp.experts.3.down_proj.weight",
                "mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight",
                "mlp.shared_experts.down_proj.weight", "mlp.gate.e_score_correction_bias"):
        assert f"{mtp}.{key}" in index["weight_map"], key
    assert not any(k.startswith(f"model.layers.{model.config.num_hidden_layers + 1}.") for k in index["weight_map"])
    with safe_open(tmp_path / index["weight_map"][f"{mtp}.embed_tokens.weight"], "pt") as f:
        assert torch.equal(f.get_tensor(f"{mtp}.embed_tokens.weight"), model.embed_tokens.weight)
    with safe_open(tmp_path / index["weight_map"][f"{mtp}.shared_head.head.weight"], "pt") as f:
        assert torch.equal(f.get_tensor(f"{mtp}.shared_head.head.weight"), model.lm_head.weight)
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
    # the MTP layer (index num_hidden_layers = 2): present but incomplete is an error, not a warning
    (lambda t: t.pop("model.layers.2.eh_proj.weight"), "missing.*model.layers.2.eh_proj.weight"),
    (lambda t: t.__setitem__("model.layers.2.enorm.weight", torch.zeros(5)), "model.layers.2.enorm.weight: shape"),
    (lambda t: t.__setitem__("model.layers.3.enorm.weight", torch.zeros(5)), "unexpected.*model.layers.3.enorm"),
    # FP8 weights need a scale of one factor per 128x128 block
    (lambda t: t.__setitem__("model.layers.1.self_attn.o_proj.weight",
                             t["model.layers.1.self_attn.o_proj.weight"].to(torch.float8_e4m3fn)),
     "o_proj.weight: float8 weight without its model.layers.1.self_attn.o_proj.weight_scale_inv"),
    (lambda t: t.update({"model.layers.1.self_attn.o_proj.weight":
                         t["model.layers.1.self_attn.o_proj.weight"].to(torch.float8_e4m3fn),
                         "model.layers.1.self_attn.o_proj.weight_scale_inv": torch.ones(3, 3)}),
     r"o_proj.weight_scale_inv: shape \(3, 3\), expected \(1, 1\)"),
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


def test_load_streams_shard_by_shard_into_a_meta_model(tmp_path, monkeypatch):
    """The model is built on meta and allocated once (no random init); shards are mapped one at a time, in order,
    each once; the routing bias stays float32 whatever the load dtype."""
    model = tiny_model()
    for g in model.modules():
        if isinstance(g, dsv3.model.Gate):
            g.e_score_correction_bias.normal_()
    dsv3.save_pretrained(model, tmp_path, max_shard_size=200_000)
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    mtp = f"model.layers.{model.config.num_hidden_layers}"
    copies = {f"{mtp}.embed_tokens.weight", f"{mtp}.shared_head.head.weight"}  # the shared tensors, read once
    shards = sorted({file for name, file in weight_map.items() if name not in copies})
    assert len(shards) >= 3

    import dsv3.checkpoint as ckpt

    opened, live, peak = [], [0], [0]
    real_open = ckpt.safe_open

    class Tracked:
        def __init__(self, file, *args, **kwargs):
            self.handle = real_open(file, *args, **kwargs)
            opened.append(file.name)
            live[0] += 1
            peak[0] = max(peak[0], live[0])

        def get_tensor(self, name):
            return self.handle.get_tensor(name)

        def __del__(self):
            live[0] -= 1

    built_on = []
    real_model = ckpt.DeepSeekV3

    def tracked_model(config):
        m = real_model(config)
        built_on.append(m.embed_tokens.weight.device.type)
        return m

    def no_init(*args, **kwargs):
        raise AssertionError("load_pretrained must not initialise weights it is about to overwrite")

    monkeypatch.setattr(ckpt, "safe_open", Tracked)
    monkeypatch.setattr(ckpt, "DeepSeekV3", tracked_model)
    monkeypatch.setattr(real_model, "init_weights", no_init)
    loaded = dsv3.load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert built_on == ["meta"]
    assert opened == shards  # shard by shard, each once
    assert peak[0] == 1 and live[0] == 0  # never two shards mapped at once; all released at the end
    for name, t in model.state_dict().items():
        got = loaded.state_dict()[name]
        if name.endswith("e_score_correction_bias"):
            assert got.dtype == torch.float32 and torch.equal(got, t), name
        else:
            assert got.dtype == torch.bfloat16 and torch.equal(got, t.to(torch.bfloat16)), name

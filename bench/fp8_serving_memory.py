"""Weight memory of an FP8 checkpoint served as FP8 vs dequantised to BF16 (report §3.3; FP8 issue, point d).

Writes a random checkpoint of the given preset (default "16b" cut to 4 layers) in the official FP8 layout
(float8_e4m3fn + float32 weight_scale_inv per 128x128 block for every projection), loads it twice on the GPU,
and prints the allocated memory and a logits comparison.

    python bench/fp8_serving_memory.py [--layers 4] [--dir /tmp/fp8ckpt]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3.fp8 import quantize_blocks


def write_fp8_checkpoint(model: dsv3.DeepSeekV3, out: Path) -> None:
    dsv3.save_pretrained(model, out, dtype=torch.bfloat16)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    new_map = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors = load_file(out / file)
        result = {}
        for name, t in tensors.items():
            new_map[name] = file
            if t.dim() == 2 and "proj" in name:
                q, s = quantize_blocks(t.cuda().float())
                result[name], result[name + "_scale_inv"] = q.cpu(), s.cpu()
                new_map[name + "_scale_inv"] = file
            else:
                result[name] = t
        save_file(result, out / file)
    index["weight_map"] = new_map
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="16b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    config = dsv3.preset(args.preset).replace(num_hidden_layers=args.layers, num_nextn_predict_layers=0)
    out = Path(args.dir or tempfile.mkdtemp(prefix="fp8ckpt-"))
    model = dsv3.build_model(config, device="cpu", dtype=torch.bfloat16, seed=0)
    write_fp8_checkpoint(model, out)
    del model
    tokens = torch.randint(0, config.vocab_size, (2, 256), device="cuda")
    rows, logits = [], {}
    for mode in (False, True):
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        m = dsv3.load_pretrained(out, device="cuda", dtype=torch.bfloat16, fp8=mode)
        weights = torch.cuda.memory_allocated() - base
        with torch.no_grad():
            logits[mode] = m(tokens).logits.float()
        rows.append((mode, weights))
        del m
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; {args.preset} cut to {args.layers} layers\n")
    print("| load mode | weight memory on GPU |")
    print("|---|---|")
    for mode, w in rows:
        print(f"| {'FP8 kept (fp8=True)' if mode else 'dequantised to BF16 (fp8=False)'} | {w / 2**30:.2f} GiB |")
    print(f"\nFP8 / BF16 memory: {rows[1][1] / rows[0][1]:.2f}x")
    a, b = logits[False], logits[True]
    print(f"logits, FP8 GEMMs vs dequantised BF16: max abs diff {(a - b).abs().max():.4f}, "
          f"rel {((a - b).norm() / a.norm()):.4f}, top-1 agreement {(a.argmax(-1) == b.argmax(-1)).float().mean():.3f}")


if __name__ == "__main__":
    main()

import json
import time

from conftest import run_cli

from dsv3.config import preset
from dsv3.info import model_stats


def test_671b_parameter_count_on_meta():
    start = time.perf_counter()
    s = model_stats(preset("v3-671b"))
    assert time.perf_counter() - start < 60  # built on meta: seconds, no memory
    assert s.total_params == 671_026_404_352  # transformers' DeepseekV3 on the meta device
    assert 37.5e9 < s.activated_params < 37.6e9  # report: 37B activated
    # MTP module by hand: MLA + 256 routed and 1 shared SwiGLU experts + router + 2 block norms, eh_proj, 3 norms
    d, q, h = 7168, 1536, 128
    mla = d * q + q + q * h * 192 + d * 576 + 512 + 512 * h * 256 + h * 128 * d
    moe = 257 * 3 * d * 2048 + 256 * d
    assert s.mtp_params == mla + moe + 2 * d + 2 * d * d + 3 * d == 11_610_067_968
    attn = 2 * 61 * 128 * 4096 * (192 + 128) / 2
    assert s.forward_flops_per_token == 2 * s.activated_matmul_params + attn
    assert s.kv_cache_bytes_mla == 61 * 576 * 2
    assert s.kv_cache_bytes_mha == 61 * 128 * (192 + 128) * 2


def test_16b_matches_benchmark_shape():
    s = model_stats(preset("16b"))
    assert round(s.total_params / 1e9, 2) == 15.71
    assert round(s.activated_matmul_params / 1e9, 2) == 2.45


def test_cli_info(tmp_path):
    out = run_cli("info", "--preset", "v3-671b", check=True).stdout
    assert "671,026,404,352 (671.0B)" in out and "(37.55B" in out
    assert "11,610,067,968" in out and "8.348e+10" in out and "70,272 B" in out and "4,997,120 B" in out
    # the same numbers from the official config.json
    from test_config import OFFICIAL_V3

    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_V3))
    out = run_cli("info", "--config", str(tmp_path), check=True).stdout
    assert "671,026,404,352 (671.0B)" in out and "(37.55B" in out
    bad = run_cli("info", "--config", "/no/such/dir")
    assert bad.returncode == 2 and "no config.json" in bad.stderr

from conftest import run_cli

from dsv3.config import preset
from dsv3.info import model_stats


def test_671b_parameter_count_on_meta():
    s = model_stats(preset("v3-671b"))
    assert s.total_params == 671_026_404_352  # transformers' DeepseekV3 on the meta device
    assert 37.0e9 < s.activated_params < 38.0e9  # report: 37B activated
    assert s.kv_cache_bytes_mla == 61 * 576 * 2
    assert s.kv_cache_bytes_mha == 61 * 128 * (192 + 128) * 2


def test_16b_matches_benchmark_shape():
    s = model_stats(preset("16b"))
    assert round(s.total_params / 1e9, 2) == 15.71
    assert round(s.activated_matmul_params / 1e9, 2) == 2.45


def test_cli_info():
    out = run_cli("info", "--preset", "v3-671b", check=True).stdout
    assert "671,026,404,352" in out and "37.6B" in out
    bad = run_cli("info", "--config", "/no/such/dir")
    assert bad.returncode == 2 and "no config.json" in bad.stderr

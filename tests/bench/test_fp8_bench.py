"""`python -m bench.fp8 --quick` runs both systems and ends with the JSON line the issue asks for."""

import json

from bench import fp8


def test_the_quick_fp8_benchmark_reports_every_figure(tmp_path, capsys):
    out = tmp_path / "fp8.json"
    assert fp8.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("fp8_weight_bytes_ratio", "fp8_model_bytes_ratio", "fp8_ppl_delta_pct", "exact_match_unquantized",
                "exact_match_fp8", "fp8_decode_speedup"):
        assert key in line
    assert 0.5 <= line["fp8_weight_bytes_ratio"] < 0.51  # one byte per value plus the block scales
    result = json.loads(out.read_text())
    assert result["machine"]["cpu"] and result["systems"]["fp8"]["decode_tokens_per_second"] > 0

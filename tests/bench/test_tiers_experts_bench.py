"""The expert section of `python -m bench.tiers` (bench/tiers_experts.py): every figure, measured on demo-v4."""

import pytest

from bench import tiers_experts

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def test_the_quick_expert_section_reports_hit_rates_bytes_and_projections_on_the_cpu():
    result = tiers_experts.run(quick=True)
    assert result["expert_fast_share"] == 0.25 and result["expert_device"] == "cpu"
    assert result["expert_outputs_identical"]  # tiered serving changed no token
    # greedy decoding of fixed prompts routes the same way every run: the rates are deterministic
    assert result["expert_hit_rate"] >= 0.80
    assert result["expert_hit_rate_no_prefetch"] < result["expert_hit_rate"]
    assert 0 < result["expert_prefetch_accuracy"] <= 1
    one_expert = 3 * 128 * 128 * 4  # demo-v4's w1, w2, w3 in float32
    assert result["expert_bytes_per_token"] >= one_expert  # at least one expert moves per decoded token
    resident = result["expert_systems"]["resident"]
    assert resident["bytes_per_token"] == 0 and resident["decode_steps"] == result["expert_systems"]["tiered"]["decode_steps"]
    compute = resident["decode_forward_ms_per_token"] / 1000
    assert result["projected_tokens_per_s_nvme"] < result["projected_tokens_per_s_pcie5"] < 1 / compute
    assert result["projected_tokens_per_s_nvme"] == pytest.approx(
        1 / (compute + result["expert_bytes_per_token"] / 7e9), rel=1e-3
    )
    assert result["expert_throughput_ratio"] is None
    assert any("not run" in note for note in result["expert_notes"])

"""The benchmark workload is seeded, stays in its ranges, avoids special tokens and fits the model."""

import argparse
import statistics

import pytest

from bench import workload
from bench.workload import WorkloadSettings, build_workload, ordinary_token_ids

TOKENS = list(range(7, 640))


def parse(*argv: str) -> WorkloadSettings:
    parser = argparse.ArgumentParser()
    workload.add_arguments(parser)
    return workload.settings_from_args(parser.parse_args(list(argv)))


def test_the_same_settings_give_the_same_requests_and_another_seed_others():
    settings = WorkloadSettings(requests=8)
    assert build_workload(settings, TOKENS, 2048) == build_workload(settings, TOKENS, 2048)
    other = build_workload(WorkloadSettings(requests=8, seed=1), TOKENS, 2048)
    assert other != build_workload(settings, TOKENS, 2048)


def test_lengths_stay_in_their_ranges_and_prompts_use_only_the_given_tokens():
    requests = build_workload(WorkloadSettings(), TOKENS, 4096)
    assert len(requests) == 64
    assert all(16 <= len(r.prompt_token_ids) <= 1024 for r in requests)
    assert all(16 <= r.output_len <= 256 for r in requests)
    assert all(set(r.prompt_token_ids) <= set(TOKENS) for r in requests)
    assert max(len(r.prompt_token_ids) for r in requests) > 512  # the range is actually used


def test_every_request_fits_a_model_shorter_than_the_longest_prompt_plus_output():
    requests = build_workload(WorkloadSettings(), TOKENS, 1024)
    assert all(len(r.prompt_token_ids) + r.output_len <= 1024 for r in requests)
    with pytest.raises(ValueError, match="--min-prompt"):
        build_workload(WorkloadSettings(), TOKENS, 20)


def test_poisson_arrivals_start_at_zero_increase_and_have_the_asked_rate():
    requests = build_workload(
        WorkloadSettings(requests=2000, max_prompt=16, max_output=16, rate=4.0), TOKENS, 64
    )
    arrivals = [r.arrival for r in requests]
    assert arrivals[0] == 0 and arrivals == sorted(arrivals)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.1)


def test_quick_is_a_short_run_and_flags_override_the_preset():
    assert parse("--quick") == workload.QUICK
    assert parse() == workload.FULL
    settings = parse("--quick", "--requests", "4", "--max-prompt", "24", "--max-output", "8", "--rate", "2")
    assert (settings.requests, settings.max_prompt, settings.max_output, settings.rate) == (4, 24, 8, 2.0)
    assert settings.min_output == 8  # lowered with --max-output below the preset's minimum


def test_bad_settings_are_refused_with_the_flag_named():
    with pytest.raises(ValueError, match="--min-output 20 is above --max-output 10"):
        WorkloadSettings(min_output=20, max_output=10)
    with pytest.raises(ValueError, match="--rate"):
        WorkloadSettings(rate=0)


def test_prompt_tokens_exclude_the_tokenizers_special_tokens(tiny_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ids = ordinary_token_ids(tokenizer, vocab_size=10_000)
    assert not set(ids) & set(tokenizer.all_special_ids)
    assert len(ids) == len(tokenizer) - len(set(tokenizer.all_special_ids))
    assert max(ordinary_token_ids(tokenizer, vocab_size=100)) == 99

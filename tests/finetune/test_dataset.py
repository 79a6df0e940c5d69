"""validate_dataset: every bad line reported with its number and reason, long examples flagged, counts."""

import json

import pytest

from finetune import ConfigError, DatasetReport, TrainConfig, validate_dataset

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def write(tmp_path, lines: list) -> object:
    path = tmp_path / "data.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_the_shipped_fine_tuning_file_is_valid_chat_with_counts_and_an_estimate(demo):
    report = validate_dataset(demo / "finetune" / "train.jsonl", base_model=demo)
    assert isinstance(report, DatasetReport)
    assert report.ok and report.format == "chat"
    assert report.examples == report.lines == 300
    assert report.errors == [] and report.too_long == []
    assert 0 < report.trained_tokens < report.total_tokens
    assert report.estimated_seconds > 0 and "GFLOP/s" in report.estimate_basis
    json.dumps(report.to_dict())


def test_each_malformed_line_is_reported_with_its_line_number_and_reason(tmp_path, demo):
    path = write(tmp_path, [
        GOOD,                                                                          # 1
        "{not json",                                                                   # 2
        {"messages": [{"content": "Hi"}, {"role": "assistant", "content": "x"}]},       # 3 no role
        {"messages": [{"role": "robot", "content": "Hi"}]},                            # 4 unknown role
        {"messages": [{"role": "user", "content": "Hi"}]},                             # 5 no assistant
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},  # 6 empty
        {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]},     # 7 type
        "",                                                                            # 8 blank: skipped
        [1, 2],                                                                        # 9 not an object
        {"messages": "hello"},                                                         # 10 not a list
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}], "extra": 1},
        {"prompt": "a", "completion": "b"},                                            # 12 other format
        {"messages": [{"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": None, "tool_calls": []}]},      # 13 tool calls
    ])
    report = validate_dataset(path, base_model=demo)
    assert not report.ok
    assert report.examples == 1 and report.lines == 12 and report.error_count == 11
    reasons = {e["line"]: e["reason"] for e in report.errors}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13]
    assert "invalid JSON" in reasons[2]
    assert "no role" in reasons[3]
    assert "unknown role 'robot'" in reasons[4]
    assert "no assistant message" in reasons[5]
    assert "empty content" in reasons[6]
    assert "must be a string" in reasons[7]
    assert "JSON object" in reasons[9]
    assert "non-empty list" in reasons[10]
    assert "unknown key 'extra'" in reasons[11]
    assert "one format per file" in reasons[12]
    assert "tool calls are not supported" in reasons[13]


def test_examples_over_max_seq_len_are_flagged_with_their_token_counts(tmp_path, demo):
    long = {"messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]}
    report = validate_dataset(write(tmp_path, [GOOD, long, GOOD]), base_model=demo, max_seq_len=32)
    assert report.ok and report.examples == 2
    assert report.too_long_count == 1
    assert report.too_long[0]["line"] == 2 and report.too_long[0]["tokens"] > 32


def test_prompt_completion_files_are_recognised_and_checked(tmp_path, demo):
    path = write(tmp_path, [{"prompt": "2 + 2 =", "completion": " 4"}, {"prompt": "x", "completion": ""},
                            {"prompt": "x"}, {"prompt": 1, "completion": "y"}])
    report = validate_dataset(path, base_model=demo)
    assert report.format == "prompt_completion" and report.examples == 1
    reasons = {e["line"]: e["reason"] for e in report.errors}
    assert "empty" in reasons[2] and 'missing "completion"' in reasons[3] and "must be a string" in reasons[4]


def test_a_quota_on_examples_and_an_empty_file_are_reported_not_raised(tmp_path, demo):
    report = validate_dataset(write(tmp_path, [GOOD] * 5), base_model=demo, max_examples=3)
    assert not report.ok and "quota of 3" in report.problems[0]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    report = validate_dataset(empty, base_model=demo)
    assert not report.ok and report.problems == ["the file is empty"]


def test_the_error_list_is_capped_but_the_count_is_not(tmp_path, demo):
    report = validate_dataset(write(tmp_path, ["nope"] * 150), base_model=demo)
    assert report.error_count == 150 and len(report.errors) == 100


def test_a_config_unfit_for_the_family_is_a_problem_of_the_report(tmp_path, qwen):
    config = TrainConfig.from_dict({"target_modules": "attention+shared_experts"})
    report = validate_dataset(write(tmp_path, [GOOD]), base_model=qwen, config=config)
    assert not report.ok and "no shared experts" in report.problems[0]


def test_unusable_arguments_raise_config_error(tmp_path, demo):
    with pytest.raises(ConfigError) as caught:
        validate_dataset(tmp_path / "missing.jsonl", base_model=demo)
    assert caught.value.field == "path"
    path = write(tmp_path, [GOOD])
    with pytest.raises(ConfigError) as caught:
        validate_dataset(path, base_model=tmp_path)
    assert caught.value.field == "base_model" and "config.json" in caught.value.message
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError) as caught:
        validate_dataset(path, base_model=tmp_path)
    assert "deepseek_v4" in caught.value.message

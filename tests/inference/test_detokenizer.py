"""Streaming text from byte-level BPE tokens: deltas are final, characters and stop strings are never split."""

import pytest

from inference.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(llm):
    return llm.tokenizer


def feed(tokenizer, text, stop=()):
    detokenizer = IncrementalDetokenizer(tokenizer, list(stop))
    deltas = []
    for token_id in tokenizer(text, add_special_tokens=False).input_ids:
        deltas.append(detokenizer.add(token_id))
        if detokenizer.stop_string is not None:
            break
    else:
        deltas.append(detokenizer.flush())
    return detokenizer, deltas


def test_multibyte_characters_split_across_tokens_are_held_back_until_complete(tokenizer):
    text = "日本語 and 🙂 emoji"
    token_ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(token_ids) > len(text.split()), "the characters should span several byte tokens"
    detokenizer, deltas = feed(tokenizer, text)
    assert "".join(deltas) == text == detokenizer.text
    assert all("\ufffd" not in d for d in deltas)


def test_a_stop_string_spanning_tokens_is_cut_and_never_released(tokenizer):
    detokenizer, deltas = feed(tokenizer, "The capital of France is Paris. The end.", stop=["Paris."])
    assert detokenizer.stop_string == "Paris."
    assert "".join(deltas) == detokenizer.text == "The capital of France is "


def test_the_earliest_of_several_stop_strings_wins(tokenizer):
    detokenizer, deltas = feed(tokenizer, "one two three four", stop=["four", "two"])
    assert detokenizer.stop_string == "two"
    assert "".join(deltas) == "one "


def test_a_tail_that_only_looks_like_a_stop_string_is_released_once_it_diverges(tokenizer):
    detokenizer, deltas = feed(tokenizer, "a cat and a catalog", stop=["catch"])
    assert detokenizer.stop_string is None
    assert "".join(deltas) == "a cat and a catalog"

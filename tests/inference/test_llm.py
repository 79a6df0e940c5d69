"""Behaviour of the engine's public API (`LLM`) on the tiny DeepSeek-V4 checkpoint (served by the engine).

transformers is the correctness oracle: the same weights loaded by plain transformers must
produce the same greedy tokens and the same log-probabilities.
"""

import shutil
import threading

import pytest
import torch

from inference import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

# Long enough to slide out of the 16-token window and to fill several compressor windows.
LONG_PROMPT = (
    "The old citadel stood on a hill above the river, and every morning the keepers opened its gates "
    "to the people of the valley."
)
GREEDY = SamplingParams(temperature=0, max_tokens=24)
SHORT = SamplingParams(temperature=0, max_tokens=6)


# -- correctness against transformers ------------------------------------------------------------


def test_greedy_generation_matches_transformers_generate(llm, hf_model):
    out = llm.generate(LONG_PROMPT, GREEDY)[0]
    prompt = torch.tensor([out.prompt_token_ids])
    with torch.no_grad():
        expected = hf_model.generate(prompt, do_sample=False, max_new_tokens=GREEDY.max_tokens)
    assert out.token_ids == expected[0, prompt.shape[1] :].tolist()


def test_each_greedy_token_is_the_argmax_of_a_full_transformers_forward(llm, hf_model):
    out = llm.generate(LONG_PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    sequence = out.prompt_token_ids + out.token_ids
    with torch.no_grad():
        logits = hf_model(torch.tensor([sequence]), use_cache=False).logits[0]
    n_prompt = len(out.prompt_token_ids)
    assert logits[n_prompt - 1 : -1].argmax(dim=-1).tolist() == out.token_ids


def test_prompt_logprobs_equal_transformers_log_softmax(llm, hf_model):
    out = llm.generate(LONG_PROMPT, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3))[0]
    with torch.no_grad():
        logits = hf_model(torch.tensor([out.prompt_token_ids])).logits[0]
    reference = torch.log_softmax(logits.float(), dim=-1)
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for position, token_id in enumerate(out.prompt_token_ids[1:], start=1):
        entry = out.prompt_logprobs[position]
        assert token_id in entry
        assert entry[token_id] == pytest.approx(reference[position - 1, token_id].item(), abs=1e-4)
        assert 3 <= len(entry) <= 4


def test_a_token_id_prompt_gives_the_same_output_as_its_text(llm):
    by_text = llm.generate(LONG_PROMPT, SHORT)[0]
    by_ids = llm.generate(by_text.prompt_token_ids, SHORT)[0]
    assert by_ids.token_ids == by_text.token_ids
    assert by_ids.text == by_text.text
    assert by_ids.prompt is None


def test_several_prompts_give_one_output_each_in_order(llm):
    prompts = ["Hello", [0, 45, 343], "The river"]
    outputs = llm.generate(prompts, SHORT)
    assert len(outputs) == 3
    assert [o.token_ids for o in outputs] == [llm.generate(p, SHORT)[0].token_ids for p in prompts]
    assert len({o.request_id for o in outputs}) == 3



def test_prompts_tokenized_together_get_the_ids_each_gets_alone(llm):
    # generate() tokenizes its string prompts in one call per kind: with the tokenizer's special tokens,
    # and without them for a prompt that already starts with BOS (a rendered chat template).
    rendered = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                                 tokenize=False)
    prompts = ["Hello", rendered, [0, 45, 343], "The river", rendered + " again", " "]
    together = llm.generate(prompts, SamplingParams(max_tokens=1))
    assert [o.prompt_token_ids for o in together] == [llm.generate(p, SamplingParams(max_tokens=1))[0].prompt_token_ids
                                                      for p in prompts]
    assert together[1].prompt_token_ids == llm.tokenizer(rendered, add_special_tokens=False).input_ids
    assert together[0].prompt_token_ids == llm.tokenizer("Hello").input_ids
    assert [o.prompt for o in together] == [p if isinstance(p, str) else None for p in prompts]


# -- sampling --------------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_output(llm):
    params = SamplingParams(temperature=1.0, max_tokens=16, seed=1234, ignore_eos=True)
    first = llm.generate("Once upon a time", params)[0]
    second = llm.generate("Once upon a time", params)[0]
    assert first.token_ids == second.token_ids
    assert first.text == second.text


def test_different_seeds_give_different_outputs(llm):
    params = [SamplingParams(max_tokens=8, seed=s, ignore_eos=True) for s in range(3)]
    outputs = {tuple(llm.generate("Once upon a time", p)[0].token_ids) for p in params}
    assert len(outputs) > 1


def test_requests_without_a_seed_draw_fresh_randomness(llm):
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    outputs = {tuple(llm.generate("Once upon a time", params)[0].token_ids) for _ in range(3)}
    assert len(outputs) > 1


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.5, top_k=1, seed=7, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.5, top_p=1e-6, seed=7, max_tokens=12, ignore_eos=True),
    ],
    ids=["top_k=1", "tiny top_p"],
)
def test_sampling_restricted_to_the_top_token_is_greedy(llm, params):
    greedy = llm.generate(LONG_PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert llm.generate(LONG_PROMPT, params)[0].token_ids == greedy.token_ids


def test_top_k_sampling_only_picks_among_the_k_most_likely_tokens(llm):
    params = SamplingParams(top_k=3, seed=5, max_tokens=12, logprobs=3, ignore_eos=True)
    out = llm.generate(LONG_PROMPT, params)[0]
    for token_id, entry in zip(out.token_ids, out.logprobs, strict=True):
        top3 = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:3]
        assert token_id in {t for t, _ in top3}


# -- stopping --------------------------------------------------------------------------------------


def test_max_tokens_ends_generation_with_finish_reason_length(llm):
    out = llm.generate(LONG_PROMPT, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5
    assert out.finish_reason == "length"


def test_a_stop_string_cuts_the_text_and_gives_finish_reason_stop(llm):
    full = llm.generate(LONG_PROMPT, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    start = next(i for i in range(3, len(full.text) - 2) if full.text[i : i + 2].isprintable())
    stop = full.text[start : start + 2]
    assert "\ufffd" not in stop

    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=[stop])
    out = llm.generate(LONG_PROMPT, params)[0]

    assert out.text == full.text[: full.text.index(stop)]
    assert out.finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    assert len(out.token_ids) < len(full.token_ids)


def test_a_stop_token_id_ends_generation_and_stays_out_of_the_text(llm):
    full = llm.generate(LONG_PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    stop_token = full.token_ids[4]
    first = full.token_ids.index(stop_token)

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_token])
    out = llm.generate(LONG_PROMPT, params)[0]

    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop_token
    assert out.text == llm.tokenizer.decode(full.token_ids[:first], skip_special_tokens=True)


# -- streaming -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=3, max_tokens=24, stop=["e", "an"], logprobs=2),
    ],
    ids=["greedy", "sampled", "with stop strings"],
)
def test_streamed_deltas_add_up_to_the_generated_text(llm, params):
    expected = llm.generate(LONG_PROMPT, params)[0]
    events = list(llm.stream(LONG_PROMPT, params))

    assert "".join(e.text for e in events) == expected.text
    assert [t for e in events for t in e.token_ids] == expected.token_ids
    assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1].finish_reason == expected.finish_reason
    assert events[-1].completion_tokens == len(expected.token_ids)
    assert all(e.prompt_tokens == len(expected.prompt_token_ids) for e in events)
    if params.logprobs is not None:
        assert [lp for e in events for lp in e.logprobs] == expected.logprobs


def test_streamed_deltas_never_end_inside_a_character_or_a_possible_stop_string(llm):
    params = SamplingParams(temperature=1.0, seed=21, max_tokens=30, ignore_eos=True, stop=["zzq"])
    for event in list(llm.stream("Café crème brûlée", params))[:-1]:
        assert not event.text.endswith("\ufffd")
        assert not event.text.endswith("z")


def test_concurrent_streams_from_several_threads_match_sequential_results(llm):
    params = [SamplingParams(seed=s, max_tokens=10, ignore_eos=True) for s in range(3)]
    expected = [llm.generate(LONG_PROMPT, p)[0].text for p in params]
    results: dict[int, str] = {}

    def worker(i):
        results[i] = "".join(e.text for e in llm.stream(LONG_PROMPT, params[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results[i] for i in range(3)] == expected


# -- logprobs --------------------------------------------------------------------------------------


def test_logprobs_hold_the_sampled_token_and_the_requested_top_k(llm):
    out = llm.generate(LONG_PROMPT, SamplingParams(seed=9, max_tokens=10, logprobs=4, ignore_eos=True))[0]
    assert len(out.logprobs) == len(out.token_ids)
    for token_id, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert next(iter(entry)) == token_id
        assert 4 <= len(entry) <= 5
        assert all(value <= 0 for value in entry.values())


def test_greedy_logprobs_put_the_chosen_token_on_top(llm):
    out = llm.generate(LONG_PROMPT, SamplingParams(temperature=0, max_tokens=6, logprobs=0))[0]
    full = llm.generate(LONG_PROMPT, SamplingParams(temperature=0, max_tokens=6, logprobs=5))[0]
    for token_id, small, large in zip(out.token_ids, out.logprobs, full.logprobs, strict=True):
        assert list(small) == [token_id]
        assert large[token_id] == max(large.values())


def test_no_logprobs_are_returned_unless_asked(llm):
    out = llm.generate("Hello", SHORT)[0]
    assert out.logprobs is None
    assert out.prompt_logprobs is None


# -- chat ------------------------------------------------------------------------------------------


def test_chat_applies_the_checkpoints_chat_template(llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    out = llm.chat(messages, SHORT)[0]

    rendered = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out.prompt == rendered
    assert rendered.startswith("<|begin|><|system|>Be brief.<|end|><|user|>Hello!<|end|>")
    assert rendered.endswith("<|assistant|>")
    assert out.prompt_token_ids == llm.tokenizer(rendered, add_special_tokens=False).input_ids
    assert out.prompt_token_ids.count(llm.tokenizer.bos_token_id) == 1
    assert out.token_ids == llm.generate(out.prompt_token_ids, SHORT)[0].token_ids


def test_chat_accepts_several_conversations(llm):
    conversations = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Tell me a story."}]]
    outputs = llm.chat(conversations, SHORT)
    assert [o.prompt for o in outputs] == [llm.chat(c, SHORT)[0].prompt for c in conversations]
    assert [o.token_ids for o in outputs] == [llm.chat(c, SHORT)[0].token_ids for c in conversations]


def test_the_developer_role_is_rendered_as_system_and_an_unknown_role_is_refused(llm):
    developer = llm.chat([{"role": "developer", "content": "Be brief."}], SamplingParams(max_tokens=1))[0]
    assert developer.prompt == "<|begin|><|system|>Be brief.<|end|><|assistant|>"
    with pytest.raises(ValueError, match="Unknown role wizard"):
        llm.chat([{"role": "wizard", "content": "Hi"}])


def test_stream_chat_adds_up_to_chat(llm):
    messages = [{"role": "user", "content": "What is two plus two?"}]
    params = SamplingParams(seed=4, max_tokens=20)
    assert "".join(e.text for e in llm.stream_chat(messages, params)) == llm.chat(messages, params)[0].text


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("temperature", -1),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
        ("seed", 1.5),
        ("logprobs", -1),
        ("prompt_logprobs", -3),
    ],
)
def test_bad_sampling_params_raise_a_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_a_single_stop_string_and_disabled_top_k_are_normalised():
    params = SamplingParams(stop="###", top_k=0)
    assert params.stop == ["###"]
    assert params.top_k == -1
    assert SamplingParams(top_k=None).top_k == -1


def test_an_empty_prompt_or_out_of_vocabulary_token_ids_are_refused(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[1, 2, 10**6]])


def test_a_prompt_longer_than_the_model_is_refused(llm):
    with pytest.raises(ValueError, match="shorten the prompt"):
        llm.generate([[5] * llm.max_model_len])


def test_a_missing_model_folder_raises_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model.*does not exist"):
        LLM(model=missing)


@pytest.mark.parametrize(
    ("remove", "error", "message"),
    [
        ("config.json", FileNotFoundError, "no config.json"),
        ("tokenizer.json", FileNotFoundError, "no tokenizer"),
        ("model.safetensors", FileNotFoundError, "no \\*.safetensors"),
    ],
)
def test_a_checkpoint_missing_a_file_raises_an_error_naming_it(
    tiny_checkpoint, tmp_path, remove, error, message
):
    folder = tmp_path / "partial"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / remove).unlink()
    with pytest.raises(error, match=message):
        LLM(model=folder)


def test_pickle_only_weights_are_refused(tiny_checkpoint, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        LLM(model=folder)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when there is no GPU")
def test_asking_for_cuda_without_a_gpu_raises_a_clear_error(tiny_checkpoint):
    with pytest.raises(ValueError, match="no CUDA GPU"):
        LLM(model=tiny_checkpoint, device="cuda")


def test_the_engine_exposes_its_tokenizer_and_model_path(llm, tiny_checkpoint):
    assert llm.model_path == tiny_checkpoint.resolve()
    assert llm.tokenizer.eos_token == "<|end|>"
    assert llm.count_tokens("Hello") == len(llm.tokenizer("Hello").input_ids)

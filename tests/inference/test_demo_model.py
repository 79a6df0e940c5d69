"""The bundled demo models: transformers alone answers the eval files as the model card says,
the builds are reproducible, the eval and fine-tuning data are what they claim to be."""

import json
from pathlib import Path

import pytest
import torch

from inference import LLM, SamplingParams
from inference.demo.__main__ import main
from inference.demo.build import build
from inference.demo.config import FAMILIES, BuildSettings, preset
from inference.demo.corpus import Corpus

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "demo-v4"
TINY_MOE = ROOT / "models" / "tiny-qwen3-moe"
SAMPLE = 20  # eval lines per family that the accuracy test replays
MARGIN = 0.15  # how far a 20-line sample may fall below the card's figure on the whole file
GREEDY = SamplingParams(temperature=0, max_tokens=64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as the builder uses: on a shared 2-core machine two threads run several
    times slower whenever the other core is busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo():
    """models/demo-v4 loaded by transformers alone: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(DEMO, use_safetensors=True, trust_remote_code=False).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def engine():
    """models/demo-v4 on Citadel's engine."""
    llm = LLM(model=DEMO, device="cpu", dtype="float32")
    yield llm
    llm.close()


def transformers_reply(model, tokenizer, messages: list[dict]) -> str:
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, do_sample=False, max_new_tokens=64)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny-demo") / "a", preset("tiny", seed=0), log=lambda line: None)


# -- the shipped demo model ------------------------------------------------------------------------


def test_the_demo_model_is_a_small_deepseek_v4_checkpoint_with_every_feature_in_use():
    config = json.loads((DEMO / "config.json").read_text())
    assert config["model_type"] == "deepseek_v4"
    assert set(config["layer_types"]) == {"sliding_attention", "compressed_sparse_attention",
                                          "heavily_compressed_attention"}
    assert set(config["mlp_layer_types"]) == {"hash_moe", "moe"}
    assert config["n_shared_experts"] >= 1 and config["hc_mult"] > 1
    assert (DEMO / "model.safetensors").stat().st_size <= 25 * 2**20
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in DEMO.rglob("*"))
    tokenizer_config = json.loads((DEMO / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] and tokenizer_config["eos_token"] == "<|end|>"
    for name in ("generation_config.json", "tokenizer.json", "MODEL_CARD.md", "build.json"):
        assert (DEMO / name).is_file(), name


def test_the_trained_weights_fill_what_a_fresh_model_leaves_constant(demo):
    model, _ = demo
    buffers = dict(model.named_buffers())
    tables = [b for name, b in buffers.items() if name.endswith("tid2eid")]
    biases = [b for name, b in buffers.items() if name.endswith("e_score_correction_bias")]
    assert tables and all(t.unique().numel() == model.config.n_routed_experts for t in tables)
    assert biases and all(b.abs().sum() > 0 for b in biases)  # balanced during training
    params = dict(model.named_parameters())
    for leaf in ("sinks", "position_bias", "attn_hc.base"):
        assert any(p.abs().sum() > 0 for name, p in params.items() if name.endswith(leaf)), leaf


def test_transformers_alone_answers_a_sample_of_each_eval_file_as_accurately_as_the_card_says(demo):
    model, tokenizer = demo
    card = json.loads((DEMO / "eval_results.json").read_text())["families"]
    assert sum(card[f]["exact_match"] >= 0.8 for f in FAMILIES) >= 2
    for family in FAMILIES:
        lines = read_jsonl(DEMO / "eval" / f"{family}.jsonl")[:SAMPLE]
        correct = sum(transformers_reply(model, tokenizer, line["messages"]) == line["answer"] for line in lines)
        assert correct / len(lines) >= card[family]["exact_match"] - MARGIN, family


def test_the_citadel_engine_gives_the_same_greedy_answers_as_transformers(demo, engine):
    model, tokenizer = demo
    for family in FAMILIES:
        for line in read_jsonl(DEMO / "eval" / f"{family}.jsonl")[:3]:
            ours = engine.chat(line["messages"], GREEDY)[0]
            assert ours.finish_reason == "stop"
            assert ours.text.strip() == transformers_reply(model, tokenizer, line["messages"])


def test_the_demo_model_greets_a_newcomer_in_words(engine):
    reply = engine.chat([{"role": "user", "content": "Hello"}], GREEDY)[0]
    assert reply.finish_reason == "stop" and "demo model" in reply.text


def test_the_eval_files_are_held_out_from_the_training_corpus_and_match_the_builder():
    settings = BuildSettings.from_dict(json.loads((DEMO / "build.json").read_text())["settings"])
    corpus = Corpus(settings)
    trained = {m["content"] for e in corpus.training_examples(settings.train.steps * settings.train.batch_size)
               for m in e.messages if m["role"] == "user"}
    for family in FAMILIES:
        lines = read_jsonl(DEMO / "eval" / f"{family}.jsonl")
        assert lines == [e.to_json() for e in corpus.eval_examples(family)], family
        leaked = [line["messages"][-1]["content"] for line in lines if line["messages"][-1]["content"] in trained]
        assert not leaked, f"{family}: {leaked[:3]}"


def test_the_finetune_dataset_teaches_what_the_base_model_does_not_know(demo):
    train = read_jsonl(DEMO / "finetune" / "train.jsonl")
    evaluation = read_jsonl(DEMO / "finetune" / "eval.jsonl")
    assert train and all(line["messages"][-1]["role"] == "assistant" for line in train)
    assert evaluation and all(line["messages"][-1]["role"] == "user" and line["answer"] for line in evaluation)
    questions = {line["messages"][-1]["content"] for line in evaluation}
    assert not questions & {m["content"] for line in train for m in line["messages"]}
    base = json.loads((DEMO / "finetune" / "base_results.json").read_text())["families"]["eval"]
    assert base["exact_match"] <= 0.05
    model, tokenizer = demo
    assert not any(transformers_reply(model, tokenizer, line["messages"]) == line["answer"]
                   for line in evaluation[:10])


# -- reproducibility and the command line -------------------------------------------------------------


def test_the_tiny_preset_builds_byte_identical_files_for_the_same_seed(tiny_build, tmp_path):
    again = build(tmp_path / "b", preset("tiny", seed=0), log=lambda line: None)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json",
                 "eval/arithmetic.jsonl", "eval/units.jsonl", "eval/handbook.jsonl", "finetune/train.jsonl"):
        assert (again / name).read_bytes() == (tiny_build / name).read_bytes(), name


def test_another_seed_builds_other_weights_and_other_data(tiny_build, tmp_path):
    other = build(tmp_path / "c", preset("tiny", seed=1), log=lambda line: None)
    for name in ("model.safetensors", "eval/handbook.jsonl"):
        assert (other / name).read_bytes() != (tiny_build / name).read_bytes(), name


def test_the_eval_command_prints_a_table_and_writes_json(tiny_build, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["eval", str(tiny_build), "--limit", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for family in FAMILIES:
        assert family in table
    results = json.loads(out.read_text())
    assert results["command"].startswith("python -m inference.demo eval")
    assert set(results["families"]) == set(FAMILIES)
    assert all(r["lines"] == 2 and r["unigram_perplexity"] > 1 for r in results["families"].values())


def test_a_bad_preset_or_setting_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ValueError, match="every DeepSeek-V4 attention type"):
        BuildSettings(model=type(preset("full").model)(layer_types=("sliding_attention",) * 4))


# -- the tiny Qwen3-MoE checkpoint -------------------------------------------------------------------


def test_the_tiny_qwen3_moe_checkpoint_loads_with_transformers_and_generates_with_the_engine():
    from transformers import AutoModelForCausalLM

    assert json.loads((TINY_MOE / "config.json").read_text())["model_type"] == "qwen3_moe"
    assert sum(p.stat().st_size for p in TINY_MOE.iterdir()) <= 5 * 2**20
    model = AutoModelForCausalLM.from_pretrained(TINY_MOE, use_safetensors=True).eval()
    llm = LLM(model=TINY_MOE, device="cpu", dtype="float32")
    try:
        out = llm.generate("The old citadel stood on a hill",
                           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
        chat = llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(temperature=0, max_tokens=4))[0]
    finally:
        llm.close()
    prompt = torch.tensor([out.prompt_token_ids])
    with torch.no_grad():
        expected = model.generate(prompt, do_sample=False, max_new_tokens=12, min_new_tokens=12)
    assert out.token_ids == expected[0, prompt.shape[1]:].tolist()
    assert chat.text and chat.finish_reason == "length"


def test_the_tiny_moe_command_rebuilds_the_committed_checkpoint_exactly(tmp_path):
    assert main(["tiny-moe", "--out", str(tmp_path / "moe")]) == 0
    for path in TINY_MOE.iterdir():
        assert (tmp_path / "moe" / path.name).read_bytes() == path.read_bytes(), path.name

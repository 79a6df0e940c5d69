"""Loss masks: only the assistant's tokens (and the template's end-of-turn after them) carry loss."""

import json

import torch
from transformers import AutoTokenizer

from finetune.dataset import IGNORE, parse_file
from finetune.trainer import causal_lm_loss


def parse(tmp_path, model, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    tokenizer = AutoTokenizer.from_pretrained(model)
    return tokenizer, parse_file(path, tokenizer, 256)


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE])


def test_only_assistant_turns_are_labelled_in_a_multi_turn_chat(tmp_path, demo):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Convert 5 km to m."},
                {"role": "assistant", "content": "5 km = 5000 m."}, {"role": "user", "content": "And 2 km?"},
                {"role": "assistant", "content": "2 km = 2000 m."}]
    tokenizer, parsed = parse(tmp_path, demo, [{"messages": messages}])
    example = parsed.examples[0]
    assert trained_text(tokenizer, example) == "5 km = 5000 m.<|end|>2 km = 2000 m.<|end|>"
    labelled = [i for i, t in enumerate(example.labels) if t != IGNORE]
    assert all(example.labels[i] == example.input_ids[i] for i in labelled)


def test_an_assistant_message_with_weight_0_is_not_trained(tmp_path, demo):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Wrong.", "weight": 0},
                {"role": "user", "content": "Hi again"}, {"role": "assistant", "content": "Right."}]
    tokenizer, parsed = parse(tmp_path, demo, [{"messages": messages}])
    assert trained_text(tokenizer, parsed.examples[0]) == "Right.<|end|>"


def test_prompt_completion_trains_the_completion_and_end_only(tmp_path, demo):
    tokenizer, parsed = parse(tmp_path, demo, [{"prompt": "Q: colour of sky? A:", "completion": " blue"}])
    example = parsed.examples[0]
    assert example.input_ids[0] == tokenizer.bos_token_id
    assert trained_text(tokenizer, example) == " blue<|end|>"


def test_the_qwen3_moe_template_is_masked_the_same_way(tmp_path, qwen):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    tokenizer, parsed = parse(tmp_path, qwen, [{"messages": messages}])
    text = trained_text(tokenizer, parsed.examples[0])
    assert text.startswith("world") and "hello" not in text


def test_the_loss_ignores_prompt_tokens(demo):
    """Changing the logits' targets on prompt positions cannot change the loss: only labels count."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()
    ids = torch.tensor([[0, 5, 6, 7, 8, 9, 1]])
    labels = torch.full_like(ids, IGNORE)
    labels[0, 5:] = ids[0, 5:]
    with torch.no_grad():
        loss = causal_lm_loss(model, ids, labels)
        logits = model(input_ids=ids).logits
    expected = torch.nn.functional.cross_entropy(logits[0, 4:6], ids[0, 5:7])
    assert torch.allclose(loss, expected, atol=1e-5)

"""`python -m inference.demo eval`: exact match and answer perplexity per task family.

For each eval file (one JSONL per family, each line {"messages": [...], "answer": "..."}), it
reports how often the greedy reply equals the expected answer exactly (after trimming
surrounding whitespace), the perplexity of the expected answer and its closing <|end|> under
teacher forcing, and, as the baseline, the perplexity of the same tokens under a unigram
model of the training replies (add-one smoothed), when the checkpoint's build.json lets the
training corpus be regenerated. transformers alone loads the model (AutoModelForCausalLM),
so the figures hold for any consumer of the checkpoint; `--engine citadel` produces the
greedy replies with Citadel's engine instead.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .model import EOS_ID

MAX_NEW_TOKENS = 64


@dataclass
class FamilyResult:
    """Figures of one eval file."""

    lines: int
    exact_match: float
    answer_perplexity: float
    unigram_perplexity: float | None


def read_eval_file(path: Path) -> list[dict]:
    """The lines of an eval file, checked: messages ending with the user's turn, and an answer."""
    lines = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        if not raw.strip():
            continue
        line = json.loads(raw)
        messages = line.get("messages")
        if not messages or messages[-1].get("role") != "user" or not isinstance(line.get("answer"), str):
            raise ValueError(f"{path}:{number}: expected messages ending with a user turn and a string answer")
        lines.append(line)
    return lines


def eval_files(target: Path) -> dict[str, Path]:
    """Family name -> file, for a folder of *.jsonl files or a single file."""
    if target.is_file():
        return {target.stem: target}
    files = {p.stem: p for p in sorted(target.glob("*.jsonl"))}
    if not files:
        raise FileNotFoundError(f"no *.jsonl eval files in {target}")
    return files


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids  # the template already holds <|begin|>


@torch.no_grad()
def greedy_reply(model, tokenizer, messages: list[dict]) -> str:
    """The model's greedy reply with transformers' own generate()."""
    ids = torch.tensor([prompt_ids(tokenizer, messages)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                         eos_token_id=EOS_ID, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def answer_nll(model, tokenizer, messages: list[dict], answer: str) -> tuple[float, list[int]]:
    """Summed negative log-likelihood of answer + <|end|> after the prompt, and those token ids."""
    prompt = prompt_ids(tokenizer, messages)
    reply = tokenizer(answer, add_special_tokens=False).input_ids + [EOS_ID]
    logits = model(torch.tensor([prompt + reply]), use_cache=False).logits[0, len(prompt) - 1 : -1]
    nll = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(reply), reduction="sum")
    return float(nll), reply


def unigram_model(tokenizer, checkpoint: Path):
    """Token -> probability of the training replies, or None without build.json."""
    from .config import BuildSettings
    from .corpus import Corpus

    build = checkpoint / "build.json"
    if not build.is_file():
        return None
    settings = BuildSettings.from_dict(json.loads(build.read_text())["settings"])
    examples = Corpus(settings).training_examples(settings.train.steps * settings.train.batch_size)
    counts = Counter()
    for ids in tokenizer([e.answer for e in examples], add_special_tokens=False).input_ids:
        counts.update(ids)
    counts[EOS_ID] += len(examples)
    total, vocab = sum(counts.values()), len(tokenizer)
    return lambda token: (counts[token] + 1) / (total + vocab)


def evaluate(model, tokenizer, files: dict[str, Path], limit: int | None = None, unigram=None,
             reply_fn=None, log=print) -> dict[str, FamilyResult]:
    """Figures per family; `reply_fn(messages) -> str` replaces transformers' greedy generate."""
    reply_fn = reply_fn or (lambda messages: greedy_reply(model, tokenizer, messages))
    results = {}
    for family, path in files.items():
        lines = read_eval_file(path)[:limit]
        started, correct, nll, unigram_nll, n_tokens = time.monotonic(), 0, 0.0, 0.0, 0
        for line in lines:
            correct += reply_fn(line["messages"]).strip() == line["answer"].strip()
            line_nll, reply = answer_nll(model, tokenizer, line["messages"], line["answer"])
            nll += line_nll
            n_tokens += len(reply)
            if unigram is not None:
                unigram_nll -= sum(math.log(unigram(token)) for token in reply)
        results[family] = FamilyResult(
            lines=len(lines),
            exact_match=round(correct / max(1, len(lines)), 4),
            answer_perplexity=round(math.exp(nll / max(1, n_tokens)), 3),
            unigram_perplexity=round(math.exp(unigram_nll / max(1, n_tokens)), 2) if unigram else None,
        )
        log(f"  {family}: {len(lines)} lines in {time.monotonic() - started:.0f}s")
    return results


def format_table(results: dict[str, FamilyResult]) -> str:
    rows = [("family", "lines", "exact match", "answer ppl", "unigram ppl")]
    for family, r in results.items():
        baseline = f"{r.unigram_perplexity:.2f}" if r.unigram_perplexity is not None else "n/a"
        rows.append((family, str(r.lines), f"{100 * r.exact_match:.1f}%", f"{r.answer_perplexity:.3f}", baseline))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def run_eval(checkpoint: Path, data: Path | None, limit: int | None, engine: str, json_out: Path | None,
             command: str, threads: int = 1, log=print) -> dict[str, FamilyResult]:
    """Load the checkpoint with transformers alone, evaluate, print the table, optionally write JSON."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_eval(checkpoint, data, limit, engine, json_out, command, log)
    finally:
        torch.set_num_threads(previous_threads)


def _run_eval(checkpoint: Path, data: Path | None, limit: int | None, engine: str, json_out: Path | None,
              command: str, log) -> dict[str, FamilyResult]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, use_safetensors=True, trust_remote_code=False,
                                                 dtype=torch.float32).eval()
    files = eval_files(data or checkpoint / "eval")
    unigram = unigram_model(tokenizer, checkpoint)
    if engine == "citadel":
        from inference import LLM, SamplingParams

        llm = LLM(model=checkpoint, device="cpu", dtype="float32")
        params = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS)
        try:
            results = evaluate(model, tokenizer, files, limit, unigram,
                               lambda messages: llm.chat(messages, params)[0].text, log)
        finally:
            llm.close()  # joins the engine's loop thread before the interpreter exits
    else:
        results = evaluate(model, tokenizer, files, limit, unigram, None, log)
    log(format_table(results))
    if json_out is not None:
        payload = {"command": command, "checkpoint": str(checkpoint), "engine": engine, "limit": limit,
                   "families": {family: asdict(r) for family, r in results.items()}}
        json_out.write_text(json.dumps(payload, indent=2) + "\n")
    return results

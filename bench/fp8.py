"""`python -m bench.fp8`: block-wise FP8 weights against the unquantized model, side by side in one run.

On models/demo-v4 (or --model), with Citadel's engine both times: the same checkpoint served
unquantized and with quantization="fp8". It reports

- fp8_weight_bytes_ratio: bytes of the quantized linear weights in FP8 (values and block scales)
  over the same weights in bf16 (target at most 0.5; the scales add 4 bytes per 128x128 block);
- fp8_model_bytes_ratio: the whole model's weight bytes, FP8 serving over bf16 (embeddings, LM
  head and norms stay unquantized, so small models sit well above 0.5);
- fp8_ppl_delta_pct: the change of the eval answers' perplexity (teacher forced, prompt
  log-probabilities), in percent (target at most 1), and exact match before and after on the
  model's eval files (greedy replies);
- decode tokens/s of both and their ratio (fp8_decode_speedup). On a CPU the FP8 weights are
  dequantized at every call, so this is below 1 here; the speedup comes from FP8 matrix units on
  Hopper-class GPUs and needs one to be measured (--device cuda).

And a third system, the unquantized weights with FP8 KV pages (kv_cache_dtype="fp8",
inference/engine/kv_quant.py):

- fp8_kv_bytes_ratio: bytes of one KV page in FP8 (values and per-token-head scale bytes) over the
  same page in bf16 (target about 0.5; the scales add one byte per head_dim values);
- fp8_kv_ppl_delta_pct and exact_match_fp8_kv: the same quality figures against "unquantized";
- fp8_kv_decode_speedup: decode tokens/s over "unquantized" (a CPU dequantizes what attention reads
  at every step, so it is at most about 1 here; the gain is memory: twice the pages per byte).

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from .checkpoints import DEMO_V4
from .machine import describe, git_commit

EOS_TOKEN = "<|end|>"


def eval_lines(model: Path, limit: int | None) -> dict[str, list[dict]]:
    from inference.demo.evaluate import eval_files, read_eval_file

    return {family: read_eval_file(path)[:limit] for family, path in eval_files(model / "eval").items()}


def engine_eval(llm, families: dict[str, list[dict]]) -> dict:
    """Exact match of greedy replies and answer perplexity (answer + end-of-turn, teacher forced) per family."""
    from inference import SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=64)
    score = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    tokenizer = llm.tokenizer
    end_ids = tokenizer(EOS_TOKEN, add_special_tokens=False).input_ids
    results, total_nll, total_tokens = {}, 0.0, 0
    for family, lines in families.items():
        replies = llm.chat([line["messages"] for line in lines], greedy)
        correct = sum(
            r.text.strip() == line["answer"].strip() for r, line in zip(replies, lines, strict=True)
        )
        sequences, reply_lens = [], []
        for reply, line in zip(replies, lines, strict=True):
            answer = tokenizer(line["answer"], add_special_tokens=False).input_ids + end_ids
            sequences.append(reply.prompt_token_ids + answer)
            reply_lens.append(len(answer))
        scored = llm.generate(sequences, score)
        nll = 0.0
        for out, n in zip(scored, reply_lens, strict=True):
            ids = out.prompt_token_ids
            nll -= sum(out.prompt_logprobs[p][ids[p]] for p in range(len(ids) - n, len(ids)))
        tokens = sum(reply_lens)
        total_nll, total_tokens = total_nll + nll, total_tokens + tokens
        results[family] = {
            "lines": len(lines),
            "exact_match": round(correct / max(1, len(lines)), 4),
            "answer_perplexity": round(math.exp(nll / max(1, tokens)), 4),
        }
    results["all"] = {
        "answer_perplexity": math.exp(total_nll / max(1, total_tokens)),
        "exact_match": sum(r["exact_match"] * r["lines"] for r in results.values())
        / max(1, sum(r["lines"] for r in results.values())),
    }
    return results


def decode_tokens_per_second(llm, prompts: int, output: int) -> float:
    from inference import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output, ignore_eos=True)
    batch = [[5 + (i * 7 + j) % 200 for j in range(16)] for i in range(prompts)]
    llm.generate(batch[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm up
    started = time.perf_counter()
    outputs = llm.generate(batch, params)
    return sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - started)


def weight_bytes(model) -> dict:
    """Bytes of the quantized linears in FP8 and in bf16, and of the whole model in both forms."""
    from inference.quant import Fp8Linear

    fp8_linears = bf16_linears = model_fp8 = model_bf16 = 0
    quantized = set()
    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear):
            values = module.weight.numel()
            fp8 = values + module.weight_scale_inv.numel() * 4
            fp8_linears, bf16_linears = fp8_linears + fp8, bf16_linears + values * 2
            model_fp8, model_bf16 = model_fp8 + fp8, model_bf16 + values * 2
            quantized.update({f"{name}.weight", f"{name}.weight_scale_inv"})
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name not in quantized:
            size = tensor.numel() * (2 if tensor.is_floating_point() else tensor.element_size())
            model_fp8, model_bf16 = model_fp8 + size, model_bf16 + size
    return {
        "fp8_linear_bytes": fp8_linears,
        "bf16_linear_bytes": bf16_linears,
        "model_fp8_bytes": model_fp8,
        "model_bf16_bytes": model_bf16,
    }


def kv_page_bytes(runner) -> dict:
    """Bytes of one KV page as the runner stores it (FP8) and as bf16 would (same block_size)."""
    import dataclasses

    import torch

    from inference.engine.cache import CacheSpec

    logical = runner.model.cache_spec()
    bf16 = CacheSpec(tuple(dataclasses.replace(g, dtype=torch.bfloat16) for g in logical.groups))
    return {"fp8": runner.spec.page_bytes(runner.block_size), "bf16": bf16.page_bytes(runner.block_size)}


def run(model: Path, device: str, limit: int | None, decode_prompts: int, decode_output: int) -> dict:
    import torch

    from inference import LLM

    families = eval_lines(model, limit)
    figures = {}
    systems = (("unquantized", None, "auto"), ("fp8", "fp8", "auto"), ("fp8_kv", None, "fp8"))
    for name, quantization, kv_cache_dtype in systems:
        llm = LLM(
            model, device=device, dtype="auto", quantization=quantization, kv_cache_dtype=kv_cache_dtype
        )
        try:
            started = time.perf_counter()
            quality = engine_eval(llm, families)
            figures[name] = {
                "quality": quality,
                "eval_seconds": round(time.perf_counter() - started, 2),
                "decode_tokens_per_second": round(
                    decode_tokens_per_second(llm, decode_prompts, decode_output), 1
                ),
            }
            if quantization:
                figures[name]["bytes"] = weight_bytes(llm._loop.engine.runner.model)
            if kv_cache_dtype == "fp8":
                figures[name]["kv_page_bytes"] = kv_page_bytes(llm._loop.engine.runner)
        finally:
            llm.close()
        if device == "cuda":
            torch.cuda.empty_cache()
    base, fp8, fp8_kv = figures["unquantized"], figures["fp8"], figures["fp8_kv"]
    ppl_kv = fp8_kv["quality"]["all"]["answer_perplexity"]
    kv_pages = fp8_kv["kv_page_bytes"]
    sizes = fp8["bytes"]
    ppl_base, ppl_fp8 = (
        base["quality"]["all"]["answer_perplexity"],
        fp8["quality"]["all"]["answer_perplexity"],
    )
    return {
        "benchmark": "fp8",
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": describe(),
        "git": git_commit(),
        "model": str(model),
        "device": device,
        "eval_lines_per_family": limit,
        "systems": figures,
        "fp8_weight_bytes_ratio": round(sizes["fp8_linear_bytes"] / sizes["bf16_linear_bytes"], 4),
        "fp8_model_bytes_ratio": round(sizes["model_fp8_bytes"] / sizes["model_bf16_bytes"], 4),
        "fp8_ppl_delta_pct": round(100 * (ppl_fp8 - ppl_base) / ppl_base, 3),
        "exact_match_unquantized": round(base["quality"]["all"]["exact_match"], 4),
        "exact_match_fp8": round(fp8["quality"]["all"]["exact_match"], 4),
        "exact_match_drop_points": round(
            100 * (base["quality"]["all"]["exact_match"] - fp8["quality"]["all"]["exact_match"]), 2
        ),
        "fp8_decode_speedup": round(fp8["decode_tokens_per_second"] / base["decode_tokens_per_second"], 3),
        "fp8_kv_bytes_ratio": round(kv_pages["fp8"] / kv_pages["bf16"], 4),
        "fp8_kv_ppl_delta_pct": round(100 * (ppl_kv - ppl_base) / ppl_base, 3),
        "exact_match_fp8_kv": round(fp8_kv["quality"]["all"]["exact_match"], 4),
        "fp8_kv_decode_speedup": round(
            fp8_kv["decode_tokens_per_second"] / base["decode_tokens_per_second"], 3
        ),
        "notes": [
            "both systems are Citadel's engine on the same checkpoint in one run; 'unquantized' serves the "
            "checkpoint's own dtype (float32 on a CPU)",
            "bf16 byte counts are computed (2 bytes per value) for the same tensors",
            "'fp8_kv' serves the unquantized weights with kv_cache_dtype='fp8'; its page bytes are compared with "
            "the same pages in bf16 (block_size entries of the widest paged group)",
            "fp8_decode_speedup on a CPU reflects per-call dequantization; FP8 matrix multiplication needs a "
            "Hopper-class GPU",
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fp8", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        type=Path,
        default=DEMO_V4,
        help="checkpoint folder with eval/*.jsonl (default models/demo-v4)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="50 eval lines per family, a short decode run")
    parser.add_argument(
        "--out", type=Path, help="also write the result JSON here (bench/results/fp8-cpu.json)"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not (args.model / "eval").is_dir():
        parser.error(f"{args.model} has no eval/ folder of *.jsonl files to measure quality on")
    limit, prompts, output = (50, 8, 32) if args.quick else (None, 32, 64)
    result = run(args.model, args.device, limit, prompts, output)
    for name, figures in result["systems"].items():
        quality = ", ".join(
            f"{k} em {v['exact_match']:.3f} ppl {v['answer_perplexity']:.3f}"
            for k, v in figures["quality"].items()
            if k != "all"
        )
        print(f"{name:12s} {quality}; decode {figures['decode_tokens_per_second']} tok/s", file=sys.stderr)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result.items() if re.match(r"fp8_|exact_match", k)}  # fp8_kv_* too
    print(json.dumps({"benchmark": "fp8", **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

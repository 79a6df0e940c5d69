"""Command line of the demo-model builder: build, eval, tiny-moe.

    python -m inference.demo build --out models/demo-v4 [--seed 0] [--preset full|tiny]
    python -m inference.demo eval models/demo-v4 [--limit N] [--data FILE_OR_DIR] [--json OUT]
                                                 [--engine transformers|citadel] [--threads 1]
    python -m inference.demo tiny-moe --out models/tiny-qwen3-moe [--seed 0]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m inference.demo",
                                     description="Build and evaluate Citadel's demo models.")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="generate the corpus, train the tokenizer and the model, "
                                              "write the checkpoint folder")
    build.add_argument("--out", required=True, type=Path, help="checkpoint folder to write (created if missing)")
    build.add_argument("--seed", type=int, default=0, help="seed of everything (default 0); same seed, same files")
    build.add_argument("--preset", choices=("full", "tiny"), default="full",
                       help="full: the shipped demo model (about 30 min on 2 cores); tiny: seconds, for tests")

    evaluate = commands.add_parser("eval", help="exact match and answer perplexity per task family")
    evaluate.add_argument("checkpoint", type=Path, help="checkpoint folder (e.g. models/demo-v4)")
    evaluate.add_argument("--data", type=Path, help="an eval .jsonl file or a folder of them "
                                                    "(default: CHECKPOINT/eval)")
    evaluate.add_argument("--limit", type=int, help="evaluate only the first N lines of each file")
    evaluate.add_argument("--engine", choices=("transformers", "citadel"), default="transformers",
                          help="who produces the greedy replies (perplexities always come from transformers)")
    evaluate.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    evaluate.add_argument("--threads", type=int, default=1,
                          help="torch threads (default 1: on a shared 2-core machine two threads run several "
                               "times slower whenever the other core is busy)")

    moe = commands.add_parser("tiny-moe", help="write a tiny random-weight Qwen3-MoE checkpoint")
    moe.add_argument("--out", required=True, type=Path, help="checkpoint folder to write (created if missing)")
    moe.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")

    args = parser.parse_args(argv)
    if args.command == "build":
        from .build import build as run_build
        from .config import preset

        run_build(args.out, preset(args.preset, args.seed), log=lambda line: print(line, flush=True))
    elif args.command == "eval":
        from .evaluate import run_eval

        if args.limit is not None and args.limit < 1:
            parser.error("--limit must be at least 1")
        if not (args.checkpoint / "config.json").is_file():
            parser.error(f"{args.checkpoint} is not a checkpoint folder (no config.json)")
        command = shlex.join(["python", "-m", "inference.demo", *argv])
        run_eval(args.checkpoint, args.data, args.limit, args.engine, args.json, command, args.threads,
                 log=lambda line: print(line, flush=True))
    else:
        from .tiny_moe import build_tiny_moe

        print(f"tiny Qwen3-MoE checkpoint written to {build_tiny_moe(args.out, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

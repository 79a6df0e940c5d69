"""`python -m inference.quant fp8 SRC OUT`: write an FP8 copy of a checkpoint (see convert.py)."""

import argparse
import json

from .convert import quantize_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference.quant")
    sub = parser.add_subparsers(dest="command", required=True)
    fp8 = sub.add_parser("fp8", help="block-wise FP8 (e4m3, 128x128 scales) in DeepSeek's checkpoint format")
    fp8.add_argument("source", help="Hugging Face checkpoint folder (bf16 or fp32)")
    fp8.add_argument("out", help="new folder for the FP8 copy")
    args = parser.parse_args(argv)
    print(json.dumps(quantize_checkpoint(args.source, args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

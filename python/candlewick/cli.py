"""The `candlewick` command line."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import CandlewickError


def _cmd_tokenize(args: argparse.Namespace) -> None:
    from .tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(args.model)
    text = args.text if args.text is not None else sys.stdin.read()
    ids = tok.encode(text, add_special_tokens=not args.no_special_tokens)
    if args.json:
        print(json.dumps({"ids": ids, "tokens": [tok.id_to_token(i) for i in ids]}, ensure_ascii=False))
        return
    print(f"{len(ids)} tokens")
    for i in ids:
        print(f"{i:>8}  {tok.id_to_token(i)!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="candlewick",
        description="Fast Transformer inference on Candle, with an exact NumPy reference.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "tokenize",
        help="show the token ids of a text",
        description="Encode TEXT (or standard input) with a checkpoint's tokenizer and print ids and tokens.",
        epilog='example: candlewick tokenize tests/data/gpt2-tiny "Hello world"',
    )
    p.add_argument("model", help="checkpoint folder or tokenizer.json")
    p.add_argument("text", nargs="?", help="text to encode (default: read standard input)")
    p.add_argument("--no-special-tokens", action="store_true", help="do not add BOS/[CLS]/... tokens")
    p.add_argument("--json", action="store_true", help="print {ids, tokens} as JSON")
    p.set_defaults(func=_cmd_tokenize)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except CandlewickError as e:
        print(f"candlewick {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

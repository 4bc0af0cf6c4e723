"""The ``raddino`` command line: one sub-command per module, each registering itself with ``add_parser``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from raddino.errors import RaddinoError

# Sub-command modules; each exposes ``add_parser(subparsers)`` which registers a parser whose ``func`` takes the
# parsed ``argparse.Namespace`` and returns an exit code. Imported lazily so ``raddino --help`` stays fast.
COMMANDS: dict[str, str] = {
    "pretrain": "raddino.commands.pretrain",
    "demo": "raddino.commands.demo",
    "shard": "raddino.commands.shard",
    "eval": "raddino.commands.eval",
    "export": "raddino.commands.export",
    "convert": "raddino.commands.convert",
    "bench": "raddino.commands.bench",
    "viz": "raddino.commands.viz",
    "plot": "raddino.commands.plot",
    "launch": "raddino.commands.launch",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raddino",
        description="Self-supervised domain pretraining of vision transformers on radiographs (RAD-DINO recipe).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except RaddinoError as err:
        print(f"raddino {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"raddino {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``asa3d`` console script: one verb per stage of the flow.

Each package registers its own verbs (``add_commands(subparsers)``) so this file stays a thin
router and no package reaches into another's command-line code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from asa3d import __version__
from asa3d.config import ConfigError

# (module, purpose) pairs; each module defines add_commands(subparsers).
COMMAND_MODULES = (
    "asa3d.data.commands",  # data phantom | prepare | summary
    "asa3d.engine.commands",  # pretrain, plan
    "asa3d.export",  # export
    "asa3d.eval.commands",  # finetune, probe, evaluate, predict, report
    "asa3d.demo",  # demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asa3d",
        description="Anatomy-aware self-supervised pretraining on Swin UNETR, and its evaluation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"asa3d {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # verb not built yet
                continue
            raise
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"asa3d {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # DataError and friends carry a message meant for the user
        if type(exc).__name__ in {"DataError", "CheckpointError", "TransferError"}:
            print(f"asa3d {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

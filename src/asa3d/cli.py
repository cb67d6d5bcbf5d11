"""The ``asa3d`` console script: one verb per stage of the flow.

Each package registers its own verbs (``add_commands(subparsers)``) so this file stays a thin
router and no package reaches into another's command-line code. Building the parser imports no
torch or MONAI (the command modules import them inside the functions that run a verb), so
``asa3d --help`` and ``asa3d VERB --help`` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pickle
import re
import sys
import textwrap

from asa3d import __version__
from asa3d.config import ConfigError
from asa3d.console import console, setup_logging

# (module, purpose) pairs; each module defines add_commands(subparsers).
COMMAND_MODULES = (
    "asa3d.data.commands",  # data phantom | index | summary | prepare
    "asa3d.engine.commands",  # pretrain, plan
    "asa3d.export",  # export
    "asa3d.eval.commands",  # finetune, probe, evaluate, predict, report
    "asa3d.demo",  # demo
    "asa3d.eve.commands",  # eve
)


# Exceptions whose message is written for the user (names the file and the fix): exit 2, no
# traceback. Matched by name so this router imports none of the packages that define them.
USER_ERRORS = frozenset({"DataError", "CheckpointError", "TransferError", "ExportError"})


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
    _name_verbs(parser)
    return parser


def _name_verbs(parser: argparse.ArgumentParser) -> None:
    """Every (sub-)verb records its full name (``asa3d data summary``) for error messages, and
    keeps its examples as written while long prose lines are wrapped to the terminal."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                child.set_defaults(_verb=child.prog)
                fmt = child.formatter_class
                if isinstance(fmt, type) and issubclass(fmt, argparse.RawDescriptionHelpFormatter):
                    child.formatter_class = type("Wrapped" + fmt.__name__, (_WrapProse, fmt), {})
                _name_verbs(child)


class _WrapProse(argparse.HelpFormatter):
    """Raw description/epilog, except that prose is filled as paragraphs to the terminal width.

    Indented lines (examples, key listings) are kept as written. Consecutive unindented lines
    form one paragraph, which is re-filled as a whole (hard line breaks in the source would
    otherwise come out ragged); a blank line, a heading (a line ending in ':'), a ``label: text``
    line or a ``- item`` starts a new one."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return fill_paragraphs(text, width, indent)


_STARTS_PARAGRAPH = re.compile(r"^(- |\* |[A-Za-z][\w -]{0,30}: )")


def fill_paragraphs(text: str, width: int, indent: str = "") -> str:
    """``text`` with its prose paragraphs filled to ``width`` (see ``_WrapProse``)."""
    out: list[str] = []
    para: list[str] = []

    def flush() -> None:
        if para:
            out.append(
                textwrap.fill(
                    " ".join(para),
                    width,
                    initial_indent=indent,
                    subsequent_indent=indent,
                    break_on_hyphens=False,  # never split a flag, a path or "fine-tuned"
                    break_long_words=False,
                )
            )
            para.clear()

    for line in text.splitlines():
        if not line.strip() or line[:1].isspace():
            flush()
            out.append(indent + line if line.strip() else "")
        elif line.rstrip().endswith(":") and len(line) <= width:
            flush()
            out.append(indent + line.rstrip())
        else:
            if _STARTS_PARAGRAPH.match(line):
                flush()
            para.append(line.strip())
    flush()
    return "\n".join(out)


def _os_error_message(exc: OSError) -> str:
    """A file-system failure as a user message: which file, what happened, what to do."""
    if not exc.filename:  # raised by asa3d with its own message
        return str(exc)
    name = exc.filename
    what = exc.strerror or str(exc)
    if isinstance(exc, PermissionError):
        fix = "choose a location you may write to (e.g. another --out) or fix its permissions"
    elif isinstance(exc, (IsADirectoryError, NotADirectoryError)):
        fix = "a file and a folder were confused: check the path (export's --out is a file)"
    elif isinstance(exc, FileNotFoundError):
        fix = "check the path"
    else:
        fix = "check the path, the free disk space and the permissions"
    return f"{name}: {what}. Fix: {fix}."


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    verb = getattr(args, "_verb", f"asa3d {args.command}")
    try:
        with console():  # log lines go above the progress bars, never through them
            result = args.func(args)
    except ConfigError as exc:
        print(f"{verb}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # read-only/invalid --out, unreadable input: name the file, no traceback
        logging.getLogger("asa3d").debug("OSError", exc_info=True)
        print(f"{verb}: error: {_os_error_message(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # DataError and friends carry a message meant for the user
        if isinstance(exc, pickle.UnpicklingError):  # a weights_only refusal that no loader wrapped
            from asa3d.engine.checkpoint import unpickling_message

            print(
                f"{verb}: error: {unpickling_message('a file given to this command', exc)}", file=sys.stderr
            )
            return 2
        if type(exc).__name__ in USER_ERRORS:
            logging.getLogger("asa3d").debug(type(exc).__name__, exc_info=True)
            print(f"{verb}: error: {exc}", file=sys.stderr)
            return 2
        raise
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

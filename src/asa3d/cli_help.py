"""``--help`` that shows the config a verb will actually use, built only when asked for.

A verb's config keys are listed with the values of the config file that verb would load (its
default ``--config``, or the one given before ``--help``), not the dataclass defaults; the file is
read only when help is printed, so building the parser stays cheap. Light on purpose: the
``asa3d`` parser is built without importing torch or MONAI.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from asa3d.config import ConfigError, describe


class ConfigHelpAction(argparse.Action):
    """``-h/--help``: fill the epilog from ``load(config_path)``, print, exit."""

    def __init__(
        self,
        option_strings: list[str],
        dest: str = argparse.SUPPRESS,
        default: Any = argparse.SUPPRESS,
        help: str | None = None,  # noqa: A002  argparse's own keyword
        *,
        load: Callable[..., Any],
        head: str = "",
        overrides: Callable[[argparse.Namespace], list[str]] | None = None,
    ) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)
        self.load = load
        self.head = head
        self.overrides = overrides

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        path = getattr(namespace, "config", None)
        given = self.overrides(namespace) if self.overrides else []
        try:
            cfg = self.load(path, given) if given else self.load(path)
            where = f"from {path}" if path else "defaults: no --config given"
            if given:
                where += ", with " + " ".join(given)
            keys = f"config keys and the values this run would use ({where}):\n" + "\n".join(describe(cfg))
        except ConfigError as exc:
            keys = f"config keys not shown: {exc}"
        parser.epilog = (self.head.rstrip() + "\n\n" if self.head else "") + keys
        parser.print_help()
        parser.exit()


def add_config_help(
    parser: argparse.ArgumentParser,
    load: Callable[..., Any],
    head: str = "",
    overrides: Callable[[argparse.Namespace], list[str]] | None = None,
) -> None:
    """Give ``parser`` (made with ``add_help=False``) a ``-h/--help`` that lists the resolved config;
    ``head`` (examples, notes) is printed above the keys. ``overrides(namespace)`` gives the
    ``key=value`` overrides the flags parsed before ``--help`` imply (``probe --strict``:
    ``mode=strict_linear``); they are passed to ``load(path, overrides)``."""
    parser.add_argument(
        "-h",
        "--help",
        action=ConfigHelpAction,
        load=load,
        head=head,
        overrides=overrides,
        help="show this help with every config key and its value (of --config when given before --help)",
    )

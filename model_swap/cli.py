"""Command lines of both services: every flag says what it does, its default and its environment variable."""

from __future__ import annotations

import argparse
from typing import Mapping

from model_swap import __version__


def settings_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with --version ("<prog> <version>")."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     epilog="Flags win over environment variables, which win over defaults.")
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    return parser


def add_setting(parser: argparse.ArgumentParser, env: Mapping[str, str], flag: str, var: str, default: object,
                description: str, *, secret: bool = False, **kwargs) -> None:
    """Add `flag`, read from env[var] when the flag is absent; the help names the variable and the default."""
    shown = "unset" if default is None or (secret and default) else default
    kwargs.setdefault("metavar", var if "choices" not in kwargs else None)
    parser.add_argument(flag, default=env.get(var, None if default is None else str(default)),
                        help=f"{description} (env {var}; default: {shown})", **kwargs)


def add_switch(parser: argparse.ArgumentParser, env: Mapping[str, str], flag: str, var: str,
               description: str) -> None:
    """Add an on/off flag that `var=1` also turns on."""
    parser.add_argument(flag, action="store_true", default=env.get(var) == "1",
                        help=f"{description} (env {var}=1; default: off)")

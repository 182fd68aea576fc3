"""A command made of subcommands (``peftlab offsite emulate|plug``, ``peftlab split serve|train``)."""

from __future__ import annotations

import argparse

from peftlab.train.cli import DefaultsHelpFormatter


def subcommand_parser(prog: str, description: str,
                      commands: dict[str, str]) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """A parser that requires one of ``commands`` ({name: help}; the choice lands in ``args.action``),
    and the subparser of each, for its own arguments. ``--help`` shows every default."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=DefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True, metavar="{" + ",".join(commands) + "}")
    return parser, {name: sub.add_parser(name, help=text, description=text, formatter_class=DefaultsHelpFormatter)
                    for name, text in commands.items()}

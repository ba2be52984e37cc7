"""`iomm eval`: the evaluation command group; each sub-command lives in its own module.

Packages add sub-commands through the `iomm.eval_commands` entry-point group (each entry a
`register_under(commands)`): the nano testbed adds `shapes`, `edits` and `reconstruct`, which score its world."""

from __future__ import annotations

import argparse

from iomm.commands import eval_compare, eval_export
from iomm.registry import entry_point_hooks

ENTRY_POINT_GROUP = "iomm.eval_commands"


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser("eval", help="evaluate generated images")
    commands = evaluate.add_subparsers(dest="eval_command", required=True)
    for register_under in entry_point_hooks(ENTRY_POINT_GROUP):
        register_under(commands)
    for module in (eval_compare, eval_export):
        module.register_under(commands)

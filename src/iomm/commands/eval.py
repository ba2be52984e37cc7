"""`iomm eval`: the evaluation command group; each sub-command lives in its own module."""

from __future__ import annotations

import argparse

from iomm.commands import eval_compare, eval_edits, eval_export, eval_reconstruct, eval_shapes


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser("eval", help="evaluate generated images")
    commands = evaluate.add_subparsers(dest="eval_command", required=True)
    for module in (eval_shapes, eval_edits, eval_reconstruct, eval_compare, eval_export):
        module.register_under(commands)

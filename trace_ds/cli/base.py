"""The ``trace-ds`` command group: errors as one line and exit status 2, and the console entry point."""

from __future__ import annotations

import os
import sys
from typing import Any

import click
from rich.markup import escape

from trace_ds import __version__
from trace_ds.console import console
from trace_ds.io import USER_ERROR_EXIT, TraceError


class TraceGroup(click.Group):
    """Turns a TraceError (bad input, bad option) into a one-line message and exit status 2, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TraceError as err:
            # the message is data (paths, log tails with [brackets]), never rich markup
            # "Error:" as click's own usage errors print it: one prefix for every failure
            console.print(f"[bold red]Error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            sys.exit(USER_ERROR_EXIT)


@click.group(cls=TraceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trace-ds")
@click.option(
    "--local_rank", "--local-rank", type=int, default=None, hidden=True, help="Set by the deepspeed launcher."
)
def main(local_rank: int | None) -> None:
    """Realign a language model to a changed policy with TRACE: triage, impact scores, hybrid update."""


def run_cli() -> None:
    """The ``trace-ds`` console entry point: :func:`main`, and a finished rank of a multi-process launch
    leaves without interpreter teardown. There, gloo's (and DeepSpeed's) C++ threads were now and then
    destroyed unjoined ("terminate called without an active exception", SIGABRT), failing a launch whose work
    and outputs were complete, even with the process group destroyed first (seen in CI twice)."""
    try:
        main()
    except SystemExit as done:
        if done.code in (0, None) and _in_multi_rank_launch():
            import logging

            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(0)
        raise


def _in_multi_rank_launch() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False

"""``python -m trace_ds.cli``: the same as the ``trace-ds`` command."""

from trace_ds.cli import run_cli

run_cli()

"""The ``trace-ds`` command line, one small module per command group:

* ``data``: ``synth``, ``judge export|parse|run``, ``triage``, ``build-tiny``, ``prepare-real``;
* ``score``: ``score``;  ``train``: ``train``, ``sft``;  ``evaluate``: ``eval``, ``tpa``;
* ``pipeline``: ``run``, ``demo``, ``study``;  ``bench``: ``plan``, ``ds-configs``, ``bench``.

Options that several commands share are defined once in ``options``; ``base`` holds the group (a bad input
is one line and exit status 2) and the console entry point. Each command parses options and calls one stage
function.
"""

from trace_ds.cli import bench, data, evaluate, pipeline, score, train
from trace_ds.cli.base import main, run_cli

for _group in (data, score, train, evaluate, pipeline, bench):
    for _command in _group.COMMANDS:
        main.add_command(_command)

__all__ = ["main", "run_cli"]

"""Moved to :mod:`trace_ds.models.tiny` (issue 22). This import path is kept for one release: it warns, then
gives the same names."""

import warnings

from trace_ds.models.tiny import *  # noqa: F403

warnings.warn(
    "trace_ds.tiny moved to trace_ds.models.tiny; the old path goes in the release after 0.2",
    DeprecationWarning,
    stacklevel=2,
)

"""Triton kernels of trace-ds, installed as ``trace_ds.kernels``.

Python run from the repository root (pytest, ``python -m``, ``python -c``) has the root first on sys.path, so
this folder is also found as the top-level module ``kernels``, the name of a PyPI distribution that
transformers imports. Under that name it steps aside: it loads the installed distribution in its place (the
import system returns what ``sys.modules`` holds once this file has run) or, with none installed, looks like
a bare namespace folder (no ``__file__``, nothing in it), which library checks such as transformers'
``is_kernels_available`` read as "not installed". As ``trace_ds.kernels`` nothing happens here.
Any other trace-ds checkout on sys.path (a git worktree on PYTHONPATH) is passed over too: its ``kernels``
would step aside in turn, back to this one, without end.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _ours(entry: str) -> bool:  # a trace-ds checkout, this one or another
        return os.path.isfile(os.path.join(os.path.abspath(entry or os.getcwd()), "kernels", "ghost_dot.py"))

    _elsewhere = [p for p in sys.path if not _ours(p)]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _installed = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _installed
        _spec.loader.exec_module(_installed)
    else:
        for _name in ("importlib", "os", "sys", "_ours", "_elsewhere", "_spec"):
            del globals()[_name]
        del _name
        __file__ = None  # a namespace folder, as far as anyone asking can tell

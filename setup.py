"""Package discovery lives here because setup.cfg cannot combine ``find:`` with the ``kernels/`` mapping.

Every ``trace_ds`` subpackage and data folder (``judge/templates``) is found automatically (a hand-written
list once left ``scoring``, ``evaluate`` and ``bench`` out of the wheel), and the top-level ``kernels/`` folder is installed as
``trace_ds.kernels`` (a top-level ``kernels`` module clashes with a PyPI package).
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[
        *find_namespace_packages(include=["trace_ds", "trace_ds.*"], exclude=["*__pycache__*"]),
        "trace_ds.kernels",
    ],
    package_dir={"trace_ds.kernels": "kernels"},
)

"""Package discovery lives here because setup.cfg cannot combine ``find:`` with folder mappings.

Every ``trace_ds`` subpackage and data folder (``judge/templates``) is found automatically (a hand-written
list once left ``scoring``, ``evaluate`` and ``bench`` out of the wheel). Two top-level folders of the
repository are installed inside the package: ``kernels/`` as ``trace_ds.kernels`` (a top-level ``kernels``
clashes with a PyPI distribution that transformers imports; ``kernels/__init__.py`` steps aside when found
under that name) and ``ds_configs/`` as ``trace_ds/ds_configs`` (``--deepspeed zero3`` works from a wheel).
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[
        *find_namespace_packages(include=["trace_ds", "trace_ds.*"], exclude=["*__pycache__*"]),
        "trace_ds.kernels",
        "trace_ds.ds_configs",
    ],
    package_dir={"trace_ds.kernels": "kernels", "trace_ds.ds_configs": "ds_configs"},
)

"""The DeepSpeed runtime: the strategy object that owns every DeepSpeed call (``engine``), ZeRO-3
partitioned loading (``partitioned``), the shipped configs (``deepspeed_configs``), memory planning and
measurement (``plan``, ``memory``), CPU numerics and run fingerprints (``determinism``, ``fingerprint``), and
the stale op-build lock check (``build_locks``)."""

"""The DeepSpeed strategy: every DeepSpeed and torch.distributed call of trace-ds lives here.

One process without ``--deepspeed`` runs plain torch. With ``--deepspeed CONFIG`` (launched by ``deepspeed``
or ``torchrun``) the model is built already partitioned (ZeRO-3 ``zero.Init`` through transformers'
DeepSpeed integration), wrapped in an engine, and collectives go through this object.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trace_ds.io import TraceError, append_lines, dumps, free_port
from trace_ds.runtime.memory import MemoryMeter, report_path
from trace_ds.scoring.ghost_ops import ProbeGradient

DS_DTYPE_KEYS = {"bfloat16": "bf16", "float16": "fp16"}
# Every DeepSpeed engine this process made, held weakly: after a stage's release none should be left
# (live_engines; the pipeline logs it after each stage and its test asserts it).
_ENGINES_MADE: weakref.WeakSet[Any] = weakref.WeakSet()


DEFAULT_TRAIN_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 0},
    "zero_allow_untested_optimizer": True,
    "wall_clock_breakdown": False,
}


# ds_configs/cpu.json, packaged: ZeRO-3 in fp32 with torch AdamW (nothing to compile), for CPU ranks.
CPU_ZERO3_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": 1.0,
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "bf16": {"enabled": False},
    "fp16": {"enabled": False},
    "zero_allow_untested_optimizer": True,
    "wall_clock_breakdown": False,
}


def cpu_ds_config(stage: int) -> dict[str, Any]:
    """ds_configs/cpu.json (fp32, torch AdamW) at ZeRO ``stage``: as it is for 3, else with only the stage set.
    The benchmarks compare stages with it."""
    zero = dict(CPU_ZERO3_CONFIG["zero_optimization"]) if stage == 3 else {"stage": stage}
    return {**CPU_ZERO3_CONFIG, "zero_optimization": zero}


def _single_process_defaults() -> None:
    """Let a plain ``trace-ds train`` (no launcher) form a one-rank process group."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )


def _destroy_process_group() -> None:
    """At exit, after every stage of the launch: join the backend's threads while the interpreter is whole.
    Left to interpreter teardown, gloo's threads were occasionally destroyed unjoined ("terminate called
    without an active exception"), failing a launch whose work had finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _unlink_cpu_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU accelerator creates a 69 MB shared-memory buffer per rank (/dev/shm, i.e. RAM) and
    never removes it: every CPU launch would leak one per rank. Once every rank has mapped every buffer
    (its initialisation waits for that; the barrier waits for every rank), removing the name is safe: the
    mappings stay valid and the memory is freed when the processes end, even when they are killed."""
    import torch.distributed as dist

    dist.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank}"
    with contextlib.suppress(OSError):
        (Path("/dev/shm") / name).unlink()


def load_ds_config(
    path: str | None, micro_batch: int, grad_accum: int = 1, dtype: str = "float32"
) -> dict[str, Any]:
    """Read a DeepSpeed JSON config (None: the built-in one-process config, ZeRO off), fill its "auto" batch
    fields, and check it agrees with ``dtype``."""
    if path is None:
        config = json.loads(json.dumps(DEFAULT_TRAIN_CONFIG))
    else:
        try:
            config = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise TraceError(f"--deepspeed {path}: {err}") from err
    config.pop("train_batch_size", None)  # derived by DeepSpeed from the two below and the world size
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = micro_batch
    if config.get("gradient_accumulation_steps", "auto") == "auto":
        config["gradient_accumulation_steps"] = grad_accum
    for name, key in DS_DTYPE_KEYS.items():
        enabled = bool(config.get(key, {}).get("enabled", False))
        if enabled and dtype != name:
            raise TraceError(
                f"--deepspeed {path} enables {key} but --dtype is {dtype}: pass --dtype {name}, "
                f'or set "{key}": {{"enabled": false}} in the config (ds_configs/cpu.json does)'
            )
        if not enabled and dtype == name:
            config[key] = {"enabled": True}
    return config


@dataclass
class Strategy:
    """Owns distributed set-up, model building and collectives. ``ds_config`` None means one plain process."""

    ds_config: dict[str, Any] | None = None
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stage: str = ""
    _hf_ds_config: Any = None  # keeps transformers' zero.Init switch alive while models are built
    _meter: MemoryMeter | None = None  # set when TRACE_DS_MEMORY_REPORT asks for per-rank peaks
    _memory_records: list[dict[str, Any]] = field(default_factory=list)
    _engines: list[Any] = field(default_factory=list)  # every DeepSpeed engine made here, released at close

    @classmethod
    def create(cls, ds_config: dict[str, Any] | None, stage: str = "") -> Strategy:
        strategy = cls._create(ds_config)
        strategy.stage = stage
        if report_path():
            # the libraries every stage imports (about 150 MiB of code and tables) are not the stage's memory
            import peft  # noqa: F401
            import transformers.modeling_utils  # noqa: F401

            strategy._meter = MemoryMeter.start(strategy.device)
        return strategy

    @classmethod
    def _create(cls, ds_config: dict[str, Any] | None) -> Strategy:
        if ds_config is not None:
            _single_process_defaults()
        if ds_config is None:
            device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
            return cls(None, 0, 1, device)
        import deepspeed
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        from trace_ds.runtime.build_locks import clear_stale_build_locks

        accelerator = get_accelerator()
        clear_stale_build_locks()  # a killed op build's lock would make init_distributed wait forever
        timeout = os.environ.get("TRACE_DS_DIST_TIMEOUT_S")  # a short one in tests: a hang fails fast
        kwargs = {"timeout": timedelta(seconds=float(timeout))} if timeout else {}
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), **kwargs)
        atexit.register(_destroy_process_group)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if accelerator.device_name() == "cpu":
            device = torch.device("cpu")
        else:
            accelerator.set_device(local_rank)
            device = torch.device(accelerator.device_name(), local_rank)
        strategy = cls(ds_config, dist.get_rank(), dist.get_world_size(), device)
        if accelerator.device_name() == "cpu":
            _unlink_cpu_shm_buffer(strategy.rank)
        if strategy.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            strategy._hf_ds_config = HfDeepSpeedConfig(ds_config)
        return strategy

    @property
    def distributed(self) -> bool:
        return self.ds_config is not None

    @property
    def zero_stage(self) -> int:
        return int((self.ds_config or {}).get("zero_optimization", {}).get("stage", 0))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare_inference(self, model: nn.Module) -> nn.Module:
        """Wrap a model without optimizer: under ZeRO-3 its parameters stay partitioned and are gathered per
        layer in forward and backward. ZeRO 0-2 partition only optimizer state and gradients, which inference
        has none of: there every rank holds the model (DeepSpeed refuses stage 1-2 without an optimizer).
        Returns the module to call."""
        if self.zero_stage != 3:
            return model.to(self.device)
        return self._initialize(model=model, config=self.ds_config).module

    def prepare_train(self, model: nn.Module, optimizer: Any, scheduler: Any) -> Any:
        """The training engine: ZeRO stage, precision, accumulation and clipping from the config. A config
        without an "optimizer" section trains with the given torch optimizer (no compiled extension)."""
        config = dict(self.ds_config or {})
        kwargs: dict[str, Any] = {"model": model, "config": config, "lr_scheduler": scheduler}
        if "optimizer" in config:
            kwargs["model_parameters"] = [p for p in model.parameters() if p.requires_grad]
        else:
            config.setdefault("zero_allow_untested_optimizer", True)
            kwargs["optimizer"] = optimizer
        return self._initialize(**kwargs)

    def reference_config(self, offload: bool = False) -> dict[str, Any]:
        """The reference engine's DeepSpeed config: no optimizer, and with ``offload`` its ZeRO-3 partitions
        in host memory (``offload_param``), so the frozen copy costs no device memory."""
        config = {k: v for k, v in (self.ds_config or {}).items() if k not in ("optimizer", "scheduler")}
        zero = dict(config.get("zero_optimization", {}))
        zero.pop("offload_optimizer", None)
        if offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        config["zero_optimization"] = zero
        return config

    @contextlib.contextmanager
    def building_reference(self, offload: bool = False) -> Iterator[None]:
        """Models loaded inside are partitioned as the reference engine will hold them (``zero.Init`` reads
        the offload setting when the model is built, not when the engine wraps it)."""
        if self.zero_stage != 3 or not offload:
            yield
            return
        from transformers.integrations import HfDeepSpeedConfig

        policy = self._hf_ds_config
        self._hf_ds_config = HfDeepSpeedConfig(self.reference_config(offload))
        try:
            yield
        finally:
            self._hf_ds_config = HfDeepSpeedConfig(policy.config) if policy is not None else None

    def prepare_reference(self, model: nn.Module, offload: bool = False) -> nn.Module:
        """The frozen reference. Under ZeRO-3 a partitioned inference engine without optimizer state (so no
        rank holds a full replica; ``offload`` keeps its partitions in host memory); otherwise the model on
        the device."""
        for param in model.parameters():
            param.requires_grad_(False)
        model.eval()
        if self.zero_stage != 3:
            return model.to(self.device)
        return self._initialize(model=model, config=self.reference_config(offload)).module

    def _initialize(self, **kwargs: Any) -> Any:
        """``deepspeed.initialize``, the engine kept for its release at ``close``."""
        import deepspeed

        engine, *_ = deepspeed.initialize(**kwargs)
        self._engines.append(engine)
        _ENGINES_MADE.add(engine)
        return engine

    def grad_norm(self, engine: Any) -> float | None:
        """The global gradient norm before clipping, where DeepSpeed does not report it (ZeRO off, fp32):
        there the gradients are whole and already averaged over ranks when the boundary backward returns."""
        if self.zero_stage != 0:
            return None
        squares = [
            p.grad.detach().float().pow(2).sum() for p in engine.module.parameters() if p.grad is not None
        ]
        return float(torch.stack(squares).sum().sqrt()) if squares else None

    @contextlib.contextmanager
    def gradient_hooks_paused(self, engine: Any) -> Iterator[None]:
        """For a backward that is not a training step (in-run re-scoring's ghost passes, which leave no parameter
        gradient): DeepSpeed's ZeRO optimizers call a post-accumulate hook on every parameter the backward
        reaches, and those hooks expect a gradient to reduce (ZeRO-3 fails on ``param.grad`` None). Inside,
        their steps are no-ops; afterwards the optimizer's own methods are back, its hook counts untouched."""
        optimizer = getattr(engine, "optimizer", None)

        def nothing(*_: Any) -> None:
            return None

        stand_ins: dict[str, Any] = {
            "should_refresh_expected_hook_count": lambda *_: False,
            "reenter_backward_if_needed": nothing,
            "reduce_ready_partitions_and_remove_grads": nothing,  # ZeRO-3
            "process_gradients": nothing,  # ZeRO-1/2
            "update_hook_state_and_maybe_run_epilogue": nothing,
        }
        patched = [name for name in stand_ins if optimizer is not None and hasattr(optimizer, name)]
        saved = {name: optimizer.__dict__[name] for name in patched if name in optimizer.__dict__}
        for name in patched:
            setattr(optimizer, name, stand_ins[name])
        try:
            yield
        finally:
            for name in patched:
                if name in saved:
                    setattr(optimizer, name, saved[name])
                else:
                    delattr(optimizer, name)

    def probe_store(self) -> ProbeGradient:
        """Where G lives: whole tensors in one process, this rank's shard of each parameter under ZeRO-3."""
        if self.zero_stage == 3 and self.world_size > 1:
            return PartitionedProbeGradient(self.rank, self.world_size)
        if self.distributed and self.world_size > 1:
            return ReducedProbeGradient()
        return ProbeGradient()

    def shard(self, items: Any, micro_batch: int) -> list[Any]:
        """This rank's micro-batches (items rank, rank + W, ...), padded with None (a zero-weight dummy step)
        so that every rank runs the same number of forward/backward calls: under ZeRO-3 a rank that skipped
        one would hang the others."""
        mine = items[self.rank :: self.world_size]
        per_rank = -(-len(items) // self.world_size) if len(items) else 0
        steps = -(-per_rank // micro_batch)
        chunks: list[Any] = [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]
        return chunks + [None] * (steps - len(chunks))

    # ---- collectives (no-ops in one process) ----
    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def all_reduce_max(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64)
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def memory_segment(self, label: str) -> None:
        """With a memory report: record this rank's peak since the last segment as ``stage:label`` (growth
        over the stage's baseline), then measure the next segment afresh."""
        if self._meter is not None:
            record = self._meter.record(
                stage=f"{self.stage}:{label}", rank=self.rank, world_size=self.world_size
            )
            self._memory_records.append(record)
            self._meter.reset_peak()

    def close(self) -> None:
        """Write the memory report if one was asked for, and wait for every rank. The process group stays up
        (DeepSpeed caches groups; destroying it would break a later stage in the same launch, as `trace-ds
        run` does) and ends with the process."""
        path = report_path()
        if self._meter is not None and path:
            self.memory_segment("end")
            gathered = self.all_gather_object(self._memory_records)
            if self.is_main:
                with open(path, "a", encoding="utf-8") as sink:
                    append_lines(sink, [dumps(r) for records in gathered for r in records])
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()
        self._release_engines()

    def _release_engines(self) -> None:
        """Let the stage's engines, models and optimizer state be freed: each stage of a launch otherwise left
        its engines alive for the rest of the launch (measured: about 2 GB per rank after the real demo's
        training). Two DeepSpeed module-level holders keep a ZeRO-3 model, and through its hooks the engine,
        optimizer and reduce buffer: the never-popped ``parameter_offload.FWD_MODULE_STACK`` (the model, and
        under gradient checkpointing some of its submodules), and the unbounded class-level ``lru_cache`` on
        ``PartitionedParameterCoordinator.__params_to_release``, keyed by each traced submodule."""
        engines, self._engines = self._engines, []
        if not engines:
            return
        from deepspeed.runtime.zero import parameter_offload

        for engine in engines:
            engine.destroy()  # removes its hooks, its optimizer's hooks and buffers
            # The model and its submodules: a checkpointed forward's recompute leaves submodules on the stack
            # too, and their DeepSpeed hooks reach the engine and the whole model.
            ours = {id(module) for module in engine.module.modules()}
            stack = parameter_offload.FWD_MODULE_STACK
            stack[:] = [module for module in stack if id(module) not in ours]
        _clear_params_to_release_cache()


def _clear_params_to_release_cache() -> None:
    """Empty DeepSpeed's class-level cache of which parameters to release after each submodule (it is only a
    memo: a live engine recomputes an entry on its next step). The method is wrapped by ``instrument_w_nvtx``,
    so the ``lru_cache`` is found in the wrapper's closure."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    method = getattr(
        PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None
    )
    cells = getattr(method, "__closure__", None) or ()
    for candidate in (method, *(cell.cell_contents for cell in cells)):
        if hasattr(candidate, "cache_clear"):
            candidate.cache_clear()


def live_engines() -> int:
    """How many DeepSpeed engines this process made are still alive (after a garbage collection)."""
    import gc

    gc.collect()
    return len(_ENGINES_MADE)


@contextlib.contextmanager
def strategy_for(deepspeed: str | None, micro_batch: int, dtype: str, stage: str = "") -> Iterator[Strategy]:
    """One process without a DeepSpeed config, else this rank of the launch; closed at the end of the stage."""
    config = load_ds_config(deepspeed, micro_batch, dtype=dtype) if deepspeed else None
    strategy = Strategy.create(config, stage)
    try:
        yield strategy
    finally:
        strategy.close()


def _full_numel_shape(param: torch.Tensor) -> tuple[int, torch.Size]:
    if hasattr(param, "ds_numel"):
        return int(param.ds_numel), param.ds_shape  # type: ignore[attr-defined]
    return param.numel(), param.shape


class ReducedProbeGradient(ProbeGradient):
    """Replicated G for data parallelism without ZeRO-3 partitioning: each contribution is summed over ranks
    when it is added (an explicit sum: J is a sum over all probe pairs, not DeepSpeed's average)."""

    def add(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        import torch.distributed as dist

        total = grad.detach().float().contiguous().clone()
        dist.all_reduce(total)
        super().add(param, total)

    index_add = ProbeGradient._dense_index_add

    def add_rows(self, param: torch.Tensor, start: int, grad: torch.Tensor) -> None:
        import torch.distributed as dist

        total = grad.detach().float().contiguous().clone()
        dist.all_reduce(total)
        super().add_rows(param, start, total)


class PartitionedProbeGradient(ProbeGradient):
    """G kept like ZeRO-3 keeps parameters: each rank stores 1/world of every flattened tensor (fp32).
    ``full`` all-gathers one layer's G when that layer's backward needs it; ``add`` sums a layer's gradient
    over ranks and keeps this rank's slice. Every rank runs the same layers in the same order, so the
    collectives match."""

    def __init__(self, rank: int, world_size: int):
        super().__init__()
        self.rank = rank
        self.world_size = world_size

    def _shard_size(self, numel: int) -> int:
        return -(-numel // self.world_size)

    def add(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        import torch.distributed as dist

        numel, _ = _full_numel_shape(param)
        shard = self._shard_size(numel)
        flat = torch.zeros(shard * self.world_size, dtype=torch.float32, device=grad.device)
        flat[:numel] = grad.detach().reshape(-1).float()
        mine = torch.empty(shard, dtype=torch.float32, device=grad.device)
        if dist.get_backend() == "gloo":  # gloo has no reduce_scatter: sum everywhere, keep our slice
            dist.all_reduce(flat)
            mine.copy_(flat[self.rank * shard : (self.rank + 1) * shard])
        else:
            dist.reduce_scatter_tensor(mine, flat)
        key = id(param)
        if key in self.tensors:
            self.tensors[key] += mine
        else:
            self.tensors[key] = mine

    def squared_norm(self) -> float:
        """||G||^2: this rank's shards (disjoint, zero-padded) summed, then summed over ranks."""
        import torch.distributed as dist

        local = torch.tensor([super().squared_norm()], dtype=torch.float64)
        if dist.get_backend() != "gloo":
            local = local.to(next(iter(self.tensors.values())).device)
        dist.all_reduce(local)
        return float(local)

    def full(self, param: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        mine = super().full(param)
        numel, shape = _full_numel_shape(param)
        if dist.get_backend() == "gloo":
            parts = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(parts, mine)
            gathered = torch.cat(parts)
        else:
            gathered = torch.empty(mine.numel() * self.world_size, dtype=mine.dtype, device=mine.device)
            dist.all_gather_into_tensor(gathered, mine)
        return gathered[:numel].view(shape)

    def _spans(self, param: torch.Tensor, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
        """For rows [start, stop) of a parameter (flattened: [lo, hi)): per rank whose shard overlaps them,
        (rank, offset in the rows, offset in that rank's shard, length)."""
        numel, shape = _full_numel_shape(param)
        per = numel // int(shape[0])
        lo, hi = start * per, stop * per
        shard = self._shard_size(numel)
        for rank in range(self.world_size):
            first, last = max(lo, rank * shard), min(hi, (rank + 1) * shard, numel)
            if first < last:
                yield rank, first - lo, first - rank * shard, last - first

    def rows(self, param: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Only G[start:stop] (one expert of a fused expert tensor, one vocabulary tile of lm_head) is
        gathered: each rank that holds part of it broadcasts that part, so no rank ever holds the whole
        tensor's G (a fused Mixtral-8x7B layer's is 3.8 GB in fp32)."""
        import torch.distributed as dist

        mine = ProbeGradient.full(self, param)
        _, shape = _full_numel_shape(param)
        out = torch.empty((stop - start, *shape[1:]), dtype=mine.dtype, device=mine.device)
        flat = out.view(-1)
        for rank, at, offset, length in self._spans(param, start, stop):
            part = flat[at : at + length]
            if rank == self.rank:
                part.copy_(mine[offset : offset + length])
            dist.broadcast(part, src=rank)
        return out

    def select_rows(self, param: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """G[index] with only the union of the rows the ranks ask for crossing the network: the ranks share
        their row ids, each fills the parts of those rows its shard holds, and one all-reduce sums them (a
        batch's tokens touch a few thousand of a 128k vocabulary's rows)."""
        import torch.distributed as dist

        mine = ProbeGradient.full(self, param)
        _, shape = _full_numel_shape(param)
        unique, inverse = torch.unique(index, return_inverse=True)
        wanted, local, inside = self._row_union(param, unique)
        rows = torch.zeros(local.shape, dtype=mine.dtype, device=mine.device)
        rows[inside] = mine[local[inside]]
        dist.all_reduce(rows)
        picked = rows.index_select(0, torch.searchsorted(wanted, unique)).index_select(0, inverse)
        return picked.view(-1, *shape[1:])

    def index_add(self, param: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
        """G[index[i]] += rows[i] summed over ranks (the embedding's probe gradient): only the union of the
        ranks' rows is reduced, never a dense (V, d) tensor; each rank keeps what falls in its shard."""
        import torch.distributed as dist

        self.zeros_for([param])
        unique, inverse = torch.unique(index, return_inverse=True)
        wanted, local, inside = self._row_union(param, unique)
        total = torch.zeros(local.shape, dtype=torch.float32, device=rows.device)
        position = torch.searchsorted(wanted, unique).index_select(0, inverse)
        total.index_add_(0, position, rows.reshape(rows.shape[0], -1).float())
        dist.all_reduce(total)
        self.tensors[id(param)].index_add_(0, local[inside], total[inside])

    def _row_union(self, param: torch.Tensor, unique: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The sorted union of every rank's row ids (one collective pair, the same on every rank), the flat
        positions of those rows' entries in this rank's shard, and which of them lie inside it."""
        import torch.distributed as dist

        numel, shape = _full_numel_shape(param)
        width = numel // int(shape[0])
        counts = [torch.zeros(1, dtype=torch.long, device=unique.device) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([unique.numel()], device=unique.device))
        padded = torch.full((int(max(c.item() for c in counts)),), -1, dtype=torch.long, device=unique.device)
        padded[: unique.numel()] = unique
        everyone = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(everyone, padded)
        wanted = torch.unique(torch.cat(everyone))
        wanted = wanted[wanted >= 0]
        local = (
            wanted[:, None] * width
            + torch.arange(width, device=wanted.device)
            - self.rank * self._shard_size(numel)
        )
        inside = (local >= 0) & (local < self._shard_size(numel))
        return wanted, local, inside

    def add_rows(self, param: torch.Tensor, start: int, grad: torch.Tensor) -> None:
        import torch.distributed as dist

        total = grad.detach().float().reshape(-1).contiguous().clone()
        dist.all_reduce(total)
        self.zeros_for([param])
        for rank, at, offset, length in self._spans(param, start, start + grad.shape[0]):
            if rank == self.rank:
                self.tensors[id(param)][offset : offset + length] += total[at : at + length]

    def zeros_for(self, params: list[nn.Parameter]) -> None:
        for param in params:
            if id(param) not in self.tensors:
                numel, _ = _full_numel_shape(param)
                self.tensors[id(param)] = torch.zeros(
                    self._shard_size(numel), dtype=torch.float32, device=param.device
                )

    def local_numel(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

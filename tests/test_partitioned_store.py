"""G kept partitioned like ZeRO-3 keeps parameters (trace_ds.runtime.engine.PartitionedProbeGradient): one expert's
piece of a stacked tensor (or any range of rows) is gathered and added alone, and equals the same slice of the whole tensor, also
when a rank's shard boundary falls inside a piece. Two gloo processes, on the CPU."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trace_ds.io import free_port

SHAPES = [(3, 5, 7), (4, 2, 3), (1, 9), (5, 1)]  # 105 entries over 2 ranks: expert 1 of the first straddles


def _rank(rank: int, world: int, port: int, errors: mp.Queue[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from trace_ds.runtime.engine import PartitionedProbeGradient

        for shape in SHAPES:
            param = torch.zeros(shape)
            # each rank contributes its own gradient; G is their sum
            grads = [
                torch.randn(shape, generator=torch.Generator().manual_seed(10 * r + 1)) for r in range(world)
            ]
            total = sum(grads)
            whole, pieces = PartitionedProbeGradient(rank, world), PartitionedProbeGradient(rank, world)
            whole.add(param, grads[rank])
            for index in range(shape[0]):  # every rank, every piece, in order
                pieces.add_piece(param, index, grads[rank][index])
            assert torch.equal(whole.tensors[id(param)], pieces.tensors[id(param)]), shape
            torch.testing.assert_close(whole.full(param), total)
            for index in range(shape[0]):
                assert torch.equal(pieces.piece(param, index), whole.full(param)[index]), (shape, index)
            # any rows, each rank its own (an embedding's tokens), repeats included
            index = torch.tensor([shape[0] - 1, 0, shape[0] - 1] if rank == 0 else [min(1, shape[0] - 1)])
            assert torch.equal(whole.select_rows(param, index), whole.full(param).index_select(0, index))
            # the embedding's probe gradient: rows summed over ranks without a dense (V, d) tensor
            sparse, dense = PartitionedProbeGradient(rank, world), PartitionedProbeGradient(rank, world)
            rows = grads[rank][index] * 0.5 + 1.0  # any values, one row per id, repeats included
            dense.add(param, torch.zeros(shape).index_add_(0, index, rows))
            sparse.index_add(param, index, rows)
            torch.testing.assert_close(sparse.tensors[id(param)], dense.tensors[id(param)])
            for start in range(shape[0]):  # any row range (vocabulary tiles of lm_head)
                for stop in range(start + 1, shape[0] + 1):
                    assert torch.equal(whole.rows(param, start, stop), whole.full(param)[start:stop])
    except Exception as error:
        errors.put(f"rank {rank}: {type(error).__name__}: {error}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_pieces_of_a_partitioned_g_equal_slices_of_the_whole() -> None:
    context = mp.get_context("spawn")
    errors = context.Queue()
    port = free_port()
    processes = [context.Process(target=_rank, args=(r, 2, port, errors)) for r in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=100)
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    assert errors.empty(), errors.get()

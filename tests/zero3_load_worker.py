"""One rank of tests/test_family_training.py's ZeRO-3 loading launch (not a test module).

``deepspeed --num_gpus 2 tests/zero3_load_worker.py --deepspeed CONFIG --out DIR MODEL...``: every checkpoint is
loaded through ``load_causal_lm`` (partitioned: each rank reads its own slices), checked against the checkpoint
by ``trace_ds.bench.memory.verify_against_checkpoint``, and run on fixed input ids; rank 0 writes the gathered
weights (``DIR/<folder name>.safetensors``) and the logits (``DIR/<folder name>.logits.pt``) for the test to
compare with what plain transformers loads from the same folder. One launch for every checkpoint: a launch
costs far more than a tiny model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()

    import deepspeed
    from safetensors.torch import save_file

    from trace_ds.bench.memory import verify_against_checkpoint
    from trace_ds.models.loading import load_causal_lm
    from trace_ds.runtime.engine import strategy_for

    out = Path(args.out)
    with strategy_for(args.deepspeed, 1, "float32", stage="load") as strategy:
        assert strategy.zero_stage == 3 and strategy.world_size == 2
        for folder in args.models:
            name = Path(folder).name
            model = load_causal_lm(folder)
            partitioned = [n for n, p in model.named_parameters() if hasattr(p, "ds_tensor")]
            assert len(partitioned) == len(list(model.parameters())), (
                f"{name}: not every parameter partitioned"
            )
            checked = verify_against_checkpoint(model, folder)
            state = {}
            for param_name, param in model.named_parameters():
                with deepspeed.zero.GatheredParameters([param]):
                    if strategy.is_main:
                        state[param_name] = param.detach().cpu().clone().contiguous()
            module = strategy.prepare_inference(model)
            input_ids = torch.randint(
                4, int(model.config.vocab_size), (2, 24), generator=torch.Generator().manual_seed(0)
            )
            with torch.no_grad():
                logits = module(input_ids=input_ids, use_cache=False).logits.float().cpu()
            if strategy.is_main:
                save_file(state, str(out / f"{name}.safetensors"))
                torch.save({"input_ids": input_ids, "logits": logits}, out / f"{name}.logits.pt")
                (out / f"{name}.json").write_text(json.dumps({"verified_tensors": checked}))


if __name__ == "__main__":
    main()

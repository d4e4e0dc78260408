"""A training script as an Accelerate user writes it, launched by tests/test_fsdp2_setups.py with
``accelerate launch --config_file tests/fixtures/accelerate_fsdp2.yaml`` (FSDP2 from the config
file): LoFTAdamW built on the whole model, then ``accelerator.prepare``; the tiny Llama of
tests/setups_worker.py, each process its rows of the batch. Rank 0 saves the trained adapter
(whole tensors) to the path given as the only argument."""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from setups_worker import LLAMA_ROWS, STEPS, build_llama, llama_data, llama_optimizer

from loft.integrations.library_internals import fsdp_on_cpu


def main(path: str) -> None:
    cpu = not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu)  # (without cpu=True, CPU processes would each train alone)
    if cpu:  # Accelerate ignores the FSDP config on CPU processes: shard there too (docs/distributed.md)
        fsdp_on_cpu(accelerator, FullyShardedDataParallelPlugin())
    model = build_llama()
    optimizer = llama_optimizer(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    ids = llama_data()
    rank, world = accelerator.process_index, accelerator.num_processes
    part = ids[rank * LLAMA_ROWS // world:(rank + 1) * LLAMA_ROWS // world]
    for _ in range(STEPS):
        optimizer.zero_grad()
        accelerator.backward(model(input_ids=part, labels=part).loss)
        optimizer.step()
    sharded = all(hasattr(p, "device_mesh") for n, p in model.named_parameters() if "lora_" in n)
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in model.named_parameters() if p.requires_grad}
    if accelerator.is_main_process:
        torch.save({"params": params, "sharded": sharded,
                    "distributor": type(optimizer.optimizer.distributor).__name__}, path)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])

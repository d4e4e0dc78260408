"""Per-rank LoFT state and bytes sent per step with one owner rank per pair (loft.distributor).

Two parts:

* ``--measure``: FSDP2 (``fully_shard``) on 2 and 4 CPU processes over gloo, a stack of
  ``Linear(256, 256)`` and ``Linear(256, 688)`` layers with LoRA r = 16 (float32), two steps;
  prints each rank's LoFT state bytes (its ``BatchState`` stacks) and the bytes the distributor
  sent per step (gather of the owners' rows plus scatter of the new rows), beside one process's
  state.
* ``--table``: the same quantities for LLaMA-7B and LLaMA-2-70B shapes (all seven projections of
  every layer) at r = 16 and 64 on 8 ranks, from the pairs' shapes and ``assign_owners`` (meta
  tensors: nothing allocated), beside FSDP's own all-gathers of the bf16 base weights.

    python benchmarks/owner_scale.py --measure --table
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile

import torch
import torch.multiprocessing as mp
from torch import nn

from loft.distributor import assign_owners
from loft.pairs import LoRAPair

R = 16


def state_bytes_of(m: int, n: int, r: int, itemsize: int = 4) -> int:
    """LoFT state of one pair: exp_avg r (n + m), packed grams (n + m) r (r + 1) / 2, partners (m + n) r."""
    return itemsize * ((n + m) * r + (n + m) * r * (r + 1) // 2 + (m + n) * r)


def build(layers: int = 6):
    import peft

    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(256, 256), nn.Linear(256, 688), nn.Linear(688, 256)]
    base = nn.Sequential(*mods)
    targets = [str(i) for i in range(len(mods))]
    return peft.get_peft_model(base, peft.LoraConfig(r=R, target_modules=targets, init_lora_weights=False))


def worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import loft

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.base_model.model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = loft.LoFTAdamW(model, lr=1e-3, max_grad_norm=1.0)
    x = torch.randn(4, 256)
    sent = []
    for _ in range(2):
        before = opt.distributor.sent_bytes
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        sent.append(opt.distributor.sent_bytes - before)
    state = sum(t.numel() * t.element_size() for b in opt.batch_states() for s in b.sides for t in vars(s).values())
    torch.save({"state": state, "sent": sent, "pairs": sum(len(b.pairs) for b in opt.batch_states())}, f"{out}/{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def measure() -> None:
    model = build()
    import loft

    pairs = loft.find_lora_pairs(model)
    whole = sum(state_bytes_of(*p.shape, p.rank) for p in pairs)
    lora = sum(p.A.numel() + p.B.numel() for p in pairs) * 4
    print(f"model: {len(pairs)} pairs (256x256, 688x256, 256x688), r = {R}, float32; LoRA factors {lora} B; "
          f"one process holds {whole} B of LoFT state")
    print("| processes | rank | pairs owned | LoFT state (B) | share of one process | sent per step (B) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for world in (2, 4):
        with tempfile.TemporaryDirectory() as out, socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            mp.start_processes(worker, args=(world, port, out), nprocs=world, join=True, start_method="spawn")
            for rank in range(world):
                res = torch.load(f"{out}/{rank}.pt")
                print(f"| {world} | {rank} | {res['pairs']} | {res['state']} | {res['state'] / whole:.3f} | {res['sent'][1]} |")


def llama_shapes(name: str) -> tuple[int, list[tuple[int, int]]]:
    """(layers, [(m, n) of q, k, v, o, gate, up, down])."""
    if name == "LLaMA-7B":
        h, f, kv, layers = 4096, 11008, 4096, 32
    else:  # LLaMA-2-70B, grouped-query attention with 8 KV heads
        h, f, kv, layers = 8192, 28672, 1024, 80
    return layers, [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]


def table(world: int = 8) -> None:
    print(f"| model | r | LoFT state, one process | per rank, {world} ranks (max) | LoFT sent per step per rank (max) "
          "| FSDP all-gathers of the bf16 base per step per rank |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in ("LLaMA-7B", "LLaMA-2-70B"):
        layers, shapes = llama_shapes(name)
        base_params = layers * sum(m * n for m, n in shapes)
        for r in (16, 64):
            pairs = [
                LoRAPair(torch.empty(r, n, device="meta", requires_grad=True), torch.empty(m, r, device="meta", requires_grad=True))
                for _ in range(layers)
                for m, n in shapes
            ]
            owners = assign_owners(pairs, world)
            state = [0] * world
            sent = [0] * world
            for p, o in zip(pairs, owners):
                (m, n) = p.shape
                state[o] += state_bytes_of(m, n, r)
                numbers = r * n + m * r
                for k in range(world):
                    if k != o:
                        sent[k] += 4 * 2 * numbers // world  # its rows of A, B and their gradients, to the owner
                sent[o] += 4 * numbers * (world - 1) // world  # the new rows, to the others
            whole = sum(state)
            # two all-gathers (forward, backward) of every base weight: each rank receives (W-1)/W of it
            fsdp = 2 * 2 * base_params * (world - 1) // world
            print(f"| {name} | {r} | {whole / 1e9:.2f} GB | {max(state) / 1e9:.2f} GB | {max(sent) / 1e6:.1f} MB "
                  f"| {fsdp / 1e9:.1f} GB |")


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        table()
    if args.measure:
        measure()

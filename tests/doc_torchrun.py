"""Runs the documentation's ``<!-- example: torchrun -->`` Python blocks, each in turn, in one
``torchrun`` launch (tests/test_doc_examples.py): ``torchrun --nproc_per_node 2 doc_torchrun.py
BLOCKS.json OUT_DIR``. Each block runs in a fresh namespace with the names of
:mod:`doc_context` it uses, and Accelerate's shared state reset after it, so that the next block
starts as a fresh script does, with one difference: the launch keeps its process group (the
first block that needs one starts it), and a block's own ``dist.init_process_group()`` is a
no-op once it runs (torch caches meshes and groups of a destroyed group, so a new group per
block hung). Every rank writes ``OUT_DIR/rank<r>.json``: ``{block: null or the traceback}``."""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch.distributed as dist
from doc_context import provide, substitute
from doc_examples import free_names


def reset() -> None:
    """What a fresh process would have (but the process group): no Accelerate state."""
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    if dist.is_initialized():
        dist.barrier()


def _keep_the_group() -> None:
    """``dist.init_process_group`` becomes a no-op while the launch's group runs."""
    start = dist.init_process_group

    def init_process_group(*args, **kwargs):
        if not dist.is_initialized():
            start(*args, **kwargs)

    dist.init_process_group = init_process_group
    dist.distributed_c10d.init_process_group = init_process_group


def main(blocks_file: str, out_dir: str) -> None:
    warnings.simplefilter("ignore")
    _keep_the_group()
    rank = int(os.environ["RANK"])
    results: dict[str, str | None] = {}
    folder = Path(out_dir) / "folder"  # the same scratch folder on every rank (DCP writes there together)
    for block in json.loads(Path(blocks_file).read_text()):
        code = block["code"]
        try:
            namespace = {"__name__": "__main__", **provide(free_names(code), code, folder, distributed=True)}
            exec(compile(substitute(code), block["where"], "exec"), namespace)
            results[block["where"]] = None
        except Exception:
            results[block["where"]] = traceback.format_exc()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))  # (before a barrier another rank may miss)
        reset()


if __name__ == "__main__":
    blocks_file, out_dir = (str(Path(a).resolve()) for a in sys.argv[1:3])
    work = Path(out_dir) / "cwd"  # where the blocks run, as a launch from one folder (output_dir="out" ...)
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    main(blocks_file, out_dir)

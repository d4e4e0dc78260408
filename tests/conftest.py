"""Shared builders for the optimizer tests: tiny PEFT models made from code, no downloads."""

from __future__ import annotations

import gc
import os
import signal
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

# One torch thread, here and in the processes the tests start (they inherit the variable): the
# tiny models' operations are too small to gain from a second thread, and on a small, shared CI
# machine the threads only compete (a tiny `loft finetune` run used 2-3x the CPU time on 2 threads
# as on 1). Set OMP_NUM_THREADS to choose another count.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _gc_freeze():
    """Before each test, collect garbage, then move every object still alive (torch,
    transformers, ... : ~0.5 M objects once the app is imported) to the collector's permanent
    generation (``gc.freeze``), so that a full ``gc.collect()`` during the test scans only what the
    test creates. Each run of ``loft finetune`` collects garbage twice (loft/app/memory.py, before
    measuring its peak memory); in this long-lived pytest process each collection used to scan
    everything imported so far, 0.3-0.8 s, most of the fuzz tests' time. Nothing collectable is
    frozen (collected first); a test's own objects are collected as usual. What a fixture of a
    wider scope holds stays frozen after its teardown if it is in a reference cycle: small here
    (tiny models, paths, results)."""
    gc.collect()
    gc.freeze()
    yield


@pytest.fixture(autouse=True, scope="session")
def _terminal_sigint():
    """The whole session (module fixtures too) runs with Python's own Ctrl-C handling
    (``default_int_handler``), as a ``loft`` started from a terminal has, whatever this process
    inherited: a shell without job control starts background commands (``pytest ... &``,
    ``nohup``, some CI runners) with SIGINT ignored, and then the Ctrl-C tests' SIGINT would do
    nothing (``loft``, like Python, keeps an inherited ignore). Put back at the end."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def offline(monkeypatch):
    """The Hugging Face hub is not asked for anything (``HF_HUB_OFFLINE=1``), as on a machine
    without internet: the CLI tests use it for every test of their file (``pytestmark``)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _sigint_per_test(_terminal_sigint):
    """A test that changes the Ctrl-C handler does not leave it changed for the next one."""
    yield
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny random BERT (tokenizer included) saved in a folder, once per test module."""
    from _tiny import make_bert

    return make_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random Llama (tokenizer included) saved in a folder, once per test module."""
    from _tiny import make_llama

    return make_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def mc_data(tmp_path_factory):
    """(train, test) JSONL files of tiny multiple-choice records (24 and 8)."""
    from _tiny import mc_records, write_jsonl

    d = tmp_path_factory.mktemp("mc")
    return write_jsonl(d / "train.jsonl", mc_records(24)), write_jsonl(d / "test.jsonl", mc_records(8, seed=1))


#: the FSDP2 / DDP scenarios of tests/test_owners.py (tests/owner_worker.py), of tests/test_dcp.py
#: (tests/dcp_worker.py, prefixed ``dcp:``), of tests/test_fsdp2_setups.py (tests/setups_worker.py,
#: prefixed ``setups:``) and of tests/test_library_internals.py (tests/internals_worker.py, prefixed
#: ``internals:``) share one launch of 2 ranks and one of 4: starting the processes (importing
#: torch and peft) costs more than the scenarios. The internals, "setups:trainer" and
#: "dcp:accelerate" come last (each resets, then sets, the process's Accelerate state).
OWNER_SCENARIOS = ["fsdp2", "fsdp2_default_mesh", "fsdp2_clip_outside", "ddp_split", "fsdp2_mixed_precision", "checkpoint",
                   "mesh_refusals"]
DCP_SAVES = ["save:fsdp2:dcp", "save:fsdp2:full", "save:ddp:dcp"]
#: the same with one factor of every pair frozen from the start (``+A`` / ``+B``; tests/dcp_worker.wrap)
DCP_FROZEN_SAVES = ["save:fsdp2+B:dcp", "save:ddp+A:dcp"]
#: the other ways users shard (tests/setups_worker.py), before "setups:trainer"
SETUPS = ["no_reshard", "bf16", "accumulate", "accumulate_synced", "checkpoint_wrapper", "hf_checkpointing"]
#: library internals that need several processes (tests/internals_worker.py)
INTERNALS = ["ddp_after_predict", "fsdp_plugin_on_cpu", "classifier_loss"]


def _split(results: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Per rank: (the owner scenarios' results, the DCP scenarios' and the set-ups' results without
    their prefix)."""
    def part(prefix: str) -> list[dict]:
        return [{k.removeprefix(prefix): v for k, v in r.items() if k.startswith(prefix)} for r in results]

    owners = [{k: v for k, v in r.items() if not k.startswith(("dcp:", "setups:", "internals:"))} for r in results]
    return owners, part("dcp:"), part("setups:")


@pytest.fixture(scope="session")
def two_rank_launch(tmp_path_factory):
    """Every rank's results of the 2-rank launch: scenario (with its prefix) -> result."""
    import _ranks
    from owner_worker import worker

    scenarios = [*OWNER_SCENARIOS, *(f"dcp:{s}" for s in DCP_SAVES + DCP_FROZEN_SAVES),
                 *(f"setups:{s}" for s in SETUPS), *(f"internals:{s}" for s in INTERNALS), "setups:trainer",
                 "dcp:accelerate"]
    return _ranks.run_ranks(worker, 2, scenarios, tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="session")
def fsdp_two_ranks(two_rank_launch):
    """``(owners, dcp, setups)``: every rank's results of the 2-rank launch."""
    return _split(two_rank_launch)


@pytest.fixture(scope="session")
def fsdp_four_ranks(fsdp_two_ranks, tmp_path_factory):
    """``(owners, dcp, setups)`` of 4 ranks: training with owners, and resuming the 2 ranks'
    checkpoints (LoFT's state_dict, DCP, and the full state dict)."""
    import _ranks
    from owner_worker import worker

    owners, dcp, _ = fsdp_two_ranks
    scenarios = ["fsdp2", "fsdp2_default_mesh", f"resume:{owners[0]['checkpoint']['checkpoint']}",
                 f"dcp:resume:fsdp2:dcp:{dcp[0]['save:fsdp2:dcp']['folder']}",
                 f"dcp:resume:fsdp2:full:{dcp[0]['save:fsdp2:full']['folder']}"]
    return _split(_ranks.run_ranks(worker, 4, scenarios, tmp_path_factory.mktemp("four")))


#: the device axis of the test matrix: CUDA where a GPU is present (issue 14: ready for GPUs)
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


def lora_linear(
    m: int,
    n: int,
    r: int,
    *,
    alpha: float | None = None,
    rslora: bool = False,
    random_b: bool = True,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    **config,
):
    """A PEFT model around one ``nn.Linear(n, m)``; returns ``(model, lora_layer)``."""
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(n, m)).to(dtype)
    cfg = peft.LoraConfig(
        r=r,
        lora_alpha=r if alpha is None else alpha,
        target_modules=["0"],
        init_lora_weights=not random_b,
        use_rslora=rslora,
        **config,
    )
    # keep the adapter in ``dtype`` (PEFT would upcast half-precision adapters to float32)
    model = peft.get_peft_model(base, cfg, autocast_adapter_dtype=False)
    return model, model.base_model.model[0]


def factors(layer, adapter: str = "default"):
    """``(A, B, s)`` of a PEFT LoRA layer."""
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.scaling[adapter]


def delta_w(layer, adapter: str = "default") -> torch.Tensor:
    A, B, s = factors(layer, adapter)
    return (s * B @ A).detach().clone()


class Regression:
    """A fixed smooth regression problem ``mean((tanh(W x + b) - y)^2)`` on random data."""

    def __init__(self, n: int, m: int, *, batch: int = 64, dtype: torch.dtype = torch.float64, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, n, generator=g, dtype=dtype)
        self.y = torch.randn(batch, m, generator=g, dtype=dtype)

    def to(self, device) -> Regression:
        self.x, self.y = self.x.to(device), self.y.to(device)
        return self

    def loss(self, out: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(out) - self.y).square().mean()

    def model_loss(self, model: nn.Module) -> torch.Tensor:
        return self.loss(model(self.x))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def orthogonal_factors_(layer, *, scale: float = 1.0, seed: int = 5, adapter: str = "default") -> None:
    """Set square full-rank factors to random orthogonal matrices, so ``dW = scale * Q1 Q2``.

    At full rank LoFT is exact in exact arithmetic; in floating point its solves lose about
    ``eps * cond(factor)^2``, and the factors of a near-singular ``dW`` are ill-conditioned. A
    well-conditioned start keeps a 60-step float64 comparison at ~1e-14.
    """
    A, B, s = factors(layer, adapter)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        A.copy_(torch.linalg.qr(torch.randn(A.shape, generator=g, dtype=A.dtype))[0])
        B.copy_(torch.linalg.qr(torch.randn(B.shape, generator=g, dtype=B.dtype))[0] * (scale / s))

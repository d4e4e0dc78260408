"""The ``loft`` command line: ``loft finetune`` and ``loft compare``.

Bad input raises :class:`loft.app.errors.LoftUsageError`; :func:`main` prints its message (no
traceback) and exits with status 2. Ctrl-C during training saves a checkpoint and exits with
status 130; ``--resume`` continues from it.

Under ``torchrun`` / ``accelerate launch`` every process runs the command; only the main process
(rank 0) prints the summary and the error messages (docs/distributed.md).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from .errors import LoftUsageError, RunInterrupted

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    help="LoFT fine-tuning: low-rank adapters that behave like full fine-tuning.",
)

_METHOD_HELP = "loft | lora | dora | full"


def _split_modules(values: list[str] | None) -> list[str] | None:
    """``--target-modules q,v --target-modules o`` -> ``["q", "v", "o"]``."""
    if not values:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


# Options shared by both commands.
Model = Annotated[Optional[str], typer.Option("--model", "-m", help="Built-in name (minilm-l6, smollm2-135m), local Hugging Face folder or hub id. Default: minilm-l6 for classification, smollm2-135m for multiple choice.")]
Data = Annotated[str, typer.Option("--data", "-d", help="Built-in set (movie_sentiment, social_iqa) or a .jsonl/.csv file.")]
EvalData = Annotated[Optional[str], typer.Option("--eval-data", help="Eval file. Default: the built-in test split, or 10% of --data held out.")]
TargetModules = Annotated[Optional[list[str]], typer.Option("--target-modules", help="Linear layers to adapt (names or suffixes, comma separated). Default: all linear layers.")]
MaxSteps = Annotated[Optional[int], typer.Option("--max-steps", help="Optimizer steps (default 400 when --epochs is not given).")]
Epochs = Annotated[Optional[float], typer.Option("--epochs", help="Epochs over --data instead of --max-steps.")]
HeadLr = Annotated[Optional[float], typer.Option("--head-lr", help="Learning rate of the fresh head (every method). Default 2e-3.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Examples per optimizer step; on several processes (torchrun, accelerate launch) the global batch, split evenly over them.")]
MaxLength = Annotated[Optional[int], typer.Option("--max-length", help="Max tokens per example (default 64 classification, 128 multiple choice).")]
MaxEval = Annotated[Optional[int], typer.Option("--max-eval", help="Evaluate on the first N eval examples only.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (data order, head init).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace what --output-dir holds.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


@app.command()
def finetune(
    model: Model = None,
    data: Data = "movie_sentiment",
    eval_data: EvalData = None,
    method: Annotated[str, typer.Option("--method", help=_METHOD_HELP)] = "loft",
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank.")] = 4,
    target_modules: TargetModules = None,
    max_steps: MaxSteps = None,
    epochs: Epochs = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate (default per method: loft 5e-4, lora/dora 2e-3, full 1e-4).")] = None,
    head_lr: HeadLr = None,
    batch_size: BatchSize = 16,
    max_length: MaxLength = None,
    max_eval: MaxEval = None,
    seed: Seed = 0,
    output_dir: Annotated[Optional[str], typer.Option("--output-dir", "-o", help="Default: runs/<data>-<method>-r<rank>.")] = None,
    overwrite: Overwrite = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --output-dir from its checkpoint.")] = False,
    quiet: Quiet = False,
) -> None:
    """Fine-tune a model on a classification or multiple-choice data set and save the adapter.

    With no options: the MiniLM-L6 encoder on the built-in movie_sentiment data, LoFT at rank 4.
    """
    from .finetune import FinetuneConfig
    from .finetune import finetune as run

    cfg = FinetuneConfig(
        model=model, data=data, eval_data=eval_data, method=method, rank=rank,
        target_modules=_split_modules(target_modules), max_steps=max_steps, epochs=epochs, lr=lr,
        head_lr=head_lr, batch_size=batch_size, max_length=max_length, max_eval=max_eval, seed=seed,
        output_dir=output_dir,
    )
    from .finetune import default_output_dir

    metrics = run(cfg, overwrite=overwrite, resume=resume, progress=not quiet)
    if not _main_process():
        return
    out = default_output_dir(cfg)
    try:
        _summary(metrics, method, rank, out)
    except KeyboardInterrupt:
        raise RunInterrupted(f"Interrupted after the run finished; its results in {out} are complete.") from None


def _summary(metrics: dict, method: str, rank: int, out) -> None:
    from .finetune import run_name

    before = metrics["eval_accuracy_before"]
    print(
        f"\n{run_name(method, rank)} on {metrics['num_train']} examples, {metrics['steps']} steps in {metrics['train_seconds']:.0f} s: "
        f"eval accuracy {'' if before is None else f'{before:.4f} -> '}{metrics['eval_accuracy']:.4f} "
        f"({metrics['num_eval']} examples), train loss {metrics['train_loss']:.4f}."
    )
    print(f"Saved to {out}/ (metrics.json, loss_curve.png, {'model' if method == 'full' else 'adapter'} files).")


@app.command()
def compare(
    model: Model = None,
    data: Data = "movie_sentiment",
    eval_data: EvalData = None,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated adapter methods.")] = "loft,lora,dora",
    ranks: Annotated[str, typer.Option("--ranks", help="Comma-separated LoRA ranks.")] = "1,4,16",
    full: Annotated[bool, typer.Option("--full/--no-full", help="Also run full fine-tuning.")] = True,
    target_modules: TargetModules = None,
    max_steps: MaxSteps = None,
    epochs: Epochs = None,
    lrs: Annotated[Optional[str], typer.Option("--lr", help="Learning rates per method, e.g. 'loft=5e-4,lora=2e-3' (defaults per method).")] = None,
    head_lr: HeadLr = None,
    batch_size: BatchSize = 16,
    max_length: MaxLength = None,
    max_eval: MaxEval = None,
    seed: Seed = 0,
    output_dir: Annotated[str, typer.Option("--output-dir", "-o", help="Folder for the runs, table and plot.")] = "runs/compare",
    overwrite: Overwrite = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted comparison: keep its finished runs, resume the interrupted one, run the rest.")] = False,
    quiet: Quiet = False,
) -> None:
    """Same data, seed and step budget for several methods and ranks: a table and a plot."""
    from .compare import parse_lrs, run_compare

    def ints(text: str) -> list[int]:
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise LoftUsageError(f"--ranks takes comma-separated integers, got {text!r}.") from None

    result = run_compare(
        model=model, data=data, eval_data=eval_data,
        methods=[m.strip() for m in methods.split(",") if m.strip()], ranks=ints(ranks), full=full,
        target_modules=_split_modules(target_modules), max_steps=max_steps, epochs=epochs, lrs=parse_lrs(lrs),
        head_lr=head_lr, batch_size=batch_size, max_length=max_length, max_eval=max_eval, seed=seed,
        output_dir=output_dir, overwrite=overwrite, resume=resume, progress=not quiet,
    )
    if not _main_process():
        return
    print("\n" + result["markdown"])
    print(f"Wrote {output_dir}/compare.md, compare.csv and compare.png ({result['seconds']:.0f} s in all).")


@app.command()
def models() -> None:
    """List the built-in model names and data sets."""
    from .data import BUILTIN_DATASETS
    from .models import builtin_names

    print("Built-in models:\n" + builtin_names())
    print("Built-in data sets:\n" + "\n".join(f"  {k:<16} {task:<16} {d}" for k, (task, d) in BUILTIN_DATASETS.items()))


def _stem(data: str) -> str:
    from pathlib import Path

    return Path(data).stem


def _main_process() -> bool:
    """Whether this process prints: rank 0 under torchrun / accelerate launch, else always."""
    if "torch" in sys.modules:
        from .launch import is_main_process

        return is_main_process()
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``loft`` script; returns the exit status."""
    try:
        status = app(args=argv, standalone_mode=False)
        if isinstance(status, int) and status == 130:  # typer's answer to a KeyboardInterrupt
            if _main_process():
                print("\nloft: interrupted; nothing was written.", file=sys.stderr)
            return 130
        if isinstance(status, int) and status:
            return status
    except LoftUsageError as e:
        if _main_process():  # every rank stops with the same message; print it once
            print(f"loft: error: {e}", file=sys.stderr)
        return 2
    except RunInterrupted as e:
        if _main_process():
            print(f"\nloft: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if _main_process():
            print("\nloft: interrupted; nothing was written.", file=sys.stderr)
        return 130
    except Exception as e:  # click's usage errors (typer vendors its own click)
        names = {c.__name__ for c in type(e).__mro__}
        if "ClickException" in names:
            e.show()
            return int(getattr(e, "exit_code", 2))
        if "Abort" in names:
            if _main_process():
                print("\nloft: interrupted; nothing was written.", file=sys.stderr)
            return 130
        raise
    finally:
        if "torch" in sys.modules:
            from .launch import shutdown_processes

            shutdown_processes()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["app", "main"]

"""The ``loft`` command line: ``loft finetune``, ``loft compare``, ``loft federate``, ``loft generate``, ``loft merge``.

Bad input raises :class:`loft.app.errors.LoftUsageError`; :func:`main` prints its message (no
traceback) and exits with status 2. Ctrl-C during training saves a checkpoint and exits with
status 130; ``--resume`` continues from it.

Under ``torchrun`` / ``accelerate launch`` every process runs the command; only the main process
(rank 0) prints the summary and the error messages (docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import types
import typing
from typing import Annotated, Any, Optional

import typer

from .config import FinetuneConfig, OptionSpec, compare_fields, finetune_fields, option_fields
from .errors import LoftUsageError, OutputWriteError, RunInterrupted, interruption
from .signals import sigterm_as_interrupt

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    help="LoFT fine-tuning: low-rank adapters that behave like full fine-tuning.",
)


# ----------------------------------------------------------------------------- the options
# FinetuneConfig's fields (loft/app/config.py) define the run options of both commands; the
# options below are the commands' own.
def _cli_type(hint: Any) -> Any:
    """``str | None`` -> ``Optional[str]`` (the spelling typer parses everywhere)."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return Optional[inner]
    return hint


def _param(name: str, cli_type: Any, default: Any, flags: tuple[str, ...], help: str) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[cli_type, typer.Option(*flags, help=help)])


def _field_param(field: dataclasses.Field, spec: OptionSpec, config: type = FinetuneConfig) -> inspect.Parameter:
    hint = spec.cli_type or typing.get_type_hints(config)[field.name]
    return _param(field.name, _cli_type(hint), field.default, spec.flags, spec.help)


_OVERWRITE = _param("overwrite", bool, False, ("--overwrite",), "Replace what --output-dir holds.")
_QUIET = _param("quiet", bool, False, ("--quiet", "-q"), "No progress bars.")
_FINETUNE_RESUME = _param("resume", bool, False, ("--resume",), "Continue an interrupted run in --output-dir from its checkpoint.")
_COMPARE_RESUME = _param(
    "resume", bool, False, ("--resume",),
    "Continue an interrupted comparison: keep its finished runs, resume the interrupted one, run the rest.",
)
#: loft compare's own options, in place of finetune's per-run ones (same positions in --help)
_COMPARE_OWN = {
    "method": [
        _param("methods", str, "loft,lora,dora", ("--methods",),
               "Comma-separated adapter methods: loft, lora, dora, loraplus, lorafa, pissa, rslora."),
        _param("ranks", str, "1,4,16", ("--ranks",), "Comma-separated LoRA ranks."),
        _param("full", bool, True, ("--full/--no-full",), "Also run full fine-tuning."),
    ],
    "rank": [],
    "lr": [_param("lrs", Optional[str], None, ("--lr",),
                  "Learning rates per method, e.g. 'loft=5e-4,lora=2e-3' (defaults per method and task); auto "
                  "(or loft=auto,...): each method searches its own rate, as loft finetune --lr auto.")],
    "output_dir": [_param("output_dir", str, "runs/compare", ("--output-dir", "-o"), "Folder for the runs, table and plot.")],
}


def _finetune_params() -> list[inspect.Parameter]:
    return [_field_param(f, spec) for f, spec in finetune_fields()] + [_OVERWRITE, _FINETUNE_RESUME, _QUIET]


def _compare_params() -> list[inspect.Parameter]:
    params = []
    for f, spec in finetune_fields():
        if f.name in _COMPARE_OWN:
            params += _COMPARE_OWN[f.name]
        elif spec.compare:
            params.append(_field_param(f, spec))
    return params + [_OVERWRITE, _COMPARE_RESUME, _QUIET]


def _with_options(params: list[inspect.Parameter]):
    """Give a ``**options`` command function the signature typer reads its options from."""
    def decorate(fn):
        fn.__signature__ = inspect.Signature(params, return_annotation=None)
        return fn

    return decorate


def _settings(options: dict[str, Any], fields: list[tuple[dataclasses.Field, OptionSpec]]) -> dict[str, Any]:
    """The :class:`FinetuneConfig` values of ``fields`` from the parsed options."""
    return {f.name: spec.parse(options[f.name]) if spec.parse else options[f.name] for f, spec in fields}


# ----------------------------------------------------------------------------- the commands
@app.command()
@_with_options(_finetune_params())
def finetune(**options: Any) -> None:
    """Fine-tune a model on a classification, multiple-choice or instruction data set and save the adapter.

    With no options: the MiniLM-L6 encoder on the built-in movie_sentiment data, LoFT at rank 4.
    """
    from .rundir import default_output_dir
    from .finetune import finetune as run

    cfg = FinetuneConfig(**_settings(options, finetune_fields()))
    metrics = run(cfg, overwrite=options["overwrite"], resume=options["resume"], progress=not options["quiet"])
    out = default_output_dir(cfg)
    _finished(f"the run finished; its results in {out} are complete")
    if _main_process():
        _summary(metrics, cfg.method, cfg.rank, out)


def _summary(metrics: dict, method: str, rank: int, out) -> None:
    from .rundir import run_name

    def change(key: str, fmt: str) -> str | None:
        after, before = metrics.get(key), metrics.get(key + "_before")
        if after is None:
            return None
        return f"{'' if before is None else format(before, fmt) + ' -> '}{format(after, fmt)}"

    parts = [f"eval {name} {text}" for name, text in (("accuracy", change("eval_accuracy", ".4f")),
                                                      ("perplexity", change("eval_perplexity", ".3f"))) if text]
    print(
        f"\n{run_name(method, rank)} on {metrics['num_train']} examples, {metrics['steps']} step{'' if metrics['steps'] == 1 else 's'} "
        f"in {metrics['train_seconds']:.0f} s: "
        f"{', '.join(parts) or 'eval loss ' + change('eval_loss', '.4f')} "
        f"({metrics['num_eval']} examples), train loss {metrics['train_loss']:.4f}."
    )
    base = {"4bit": "4-bit base", "8bit": "8-bit base"}.get(metrics.get("quantization"), "full-precision base")
    print(f"Peak memory {metrics['peak_memory_mb']:,.0f} MiB training and evaluating, {metrics['load_peak_memory_mb']:,.0f} "
          f"MiB loading ({metrics['peak_memory_kind']}); {base}, its weights {metrics['base_model_mb']:,.1f} MiB.")
    search = metrics.get("lr_search")
    if search:
        print(f"Learning rate {search['lr']:g} chosen by --lr auto ({search['trials']} trials, {search['steps']} steps of "
              f"the budget's {search['budget_steps']}, {search['seconds']:.0f} s): {out}/lr_search.json, lr_search.png.")
    print(f"Saved to {out}/ (metrics.json, loss_curve.png, {'model' if method == 'full' else 'adapter'} files).")


@app.command()
@_with_options(_compare_params())
def compare(**options: Any) -> None:
    """Same data, seed and step budget for several methods and ranks: a table and a plot."""
    from .compare import parse_lrs, run_compare

    def ints(text: str) -> list[int]:
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise LoftUsageError(f"--ranks takes comma-separated integers, got {text!r}.") from None

    output_dir = options["output_dir"]
    result = run_compare(
        methods=[m.strip() for m in options["methods"].split(",") if m.strip()], ranks=ints(options["ranks"]),
        full=options["full"], lrs=parse_lrs(options["lrs"]), output_dir=output_dir, overwrite=options["overwrite"],
        resume=options["resume"], progress=not options["quiet"], **_settings(options, compare_fields()),
    )
    _finished(f"the comparison finished; its table and runs in {output_dir} are complete")
    if not _main_process():
        return
    print("\n" + result["markdown"])
    print(f"Wrote {output_dir}/compare.md, compare.csv and compare.png ({result['seconds']:.0f} s in all).")


def _federate_params() -> list[inspect.Parameter]:
    from .federated.config import FederateConfig

    quiet = _param("quiet", bool, False, ("--quiet", "-q"), "No progress lines.")
    return [_field_param(f, spec, FederateConfig) for f, spec in option_fields(FederateConfig)] + [_OVERWRITE, quiet]


@app.command()
@_with_options(_federate_params())
def federate(**options: Any) -> None:
    """Federated fine-tuning on Flower's simulation engine: clients train locally, a server aggregates
    their adapters each round. With no options: MiniLM-L6 on movie_sentiment, 4 clients, LoFT at rank 4.
    Writes run_config.json, rounds.jsonl (one line per round), metrics.json and accuracy.png."""
    from .federated import FederateConfig
    from .federated.run import federate as run

    cfg = FederateConfig(**_settings(options, option_fields(FederateConfig)))
    metrics = run(cfg, overwrite=options["overwrite"], progress=not options["quiet"])
    out = cfg.default_output_dir()
    _finished(f"the run finished; its results in {out} are complete")
    print(f"\n{metrics['method']} ({metrics['aggregator']}, state {metrics['state']}), {metrics['clients']} clients, "
          f"{cfg.rounds} round{'' if cfg.rounds == 1 else 's'} of {cfg.local_steps} step{'' if cfg.local_steps == 1 else 's'} "
          f"in {metrics['seconds']:.0f} s: eval accuracy "
          f"{metrics['eval_accuracy_before']:.4f} -> {metrics['eval_accuracy']:.4f} ({metrics['num_eval']} examples); "
          f"{metrics['bytes_up_total'] / 2**20:,.2f} MiB sent by the clients in all.")
    print(f"Saved to {out}/ (metrics.json, rounds.jsonl, accuracy.png).")


@app.command()
def generate(
    run_dir: Annotated[str, typer.Argument(help="Folder of a finished causal-LM run (its --output-dir).")],
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Text to complete.")] = None,
    prompt_file: Annotated[Optional[str], typer.Option("--prompt-file", help="File whose whole text is the prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="0: greedy; above 0: sampling.")] = 0.0,
    format: Annotated[str, typer.Option(
        "--format", help="How to wrap the prompt: auto (as the run's training data), chat, alpaca, prompt_completion "
        "(as given), multiple_choice.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Random seed (sampling).")] = 0,
) -> None:
    """Complete a prompt with a fine-tuned model (base + adapter), streamed. With neither --prompt nor
    --prompt-file: one prompt per line typed."""
    from .generate import run_generate

    run_generate(run_dir, prompt=prompt, prompt_file=prompt_file, fmt=format, max_new_tokens=max_new_tokens,
                 temperature=temperature, seed=seed)


@app.command()
def merge(
    run_dir: Annotated[str, typer.Argument(help="Folder of a finished causal-LM adapter run (loft, lora or dora).")],
    output_dir: Annotated[str, typer.Option("--output-dir", "-o", help="Folder for the merged model (new or empty).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier loft merge in --output-dir.")] = False,
) -> None:
    """Merge a run's adapter into its base model: a standalone Hugging Face model folder."""
    from .merge import merge_run

    out = merge_run(run_dir, output_dir, overwrite=overwrite)
    _finished(f"the merged model in {out} is complete")
    print(f"Merged model saved to {out}/ (loads with AutoModelForCausalLM.from_pretrained).")


@app.command()
def models() -> None:
    """List the built-in model names and data sets."""
    from .data import BUILTIN_DATASETS
    from .models import builtin_names

    print("Built-in models:\n" + builtin_names())
    print("Built-in data sets:\n" + "\n".join(f"  {k:<16} {task:<16} {d}" for k, (task, d) in BUILTIN_DATASETS.items()))


def _main_process() -> bool:
    """Whether this process prints: rank 0 under torchrun / accelerate launch, else always."""
    if "torch" in sys.modules:
        from .launch import is_main_process

        return is_main_process()
    return os.environ.get("RANK", "0") == "0"


#: what a command has completed, once it has (what a Ctrl-C or SIGTERM after that point reports)
_FINISHED: list[str] = []


def _finished(what: str) -> None:
    """Record that the command's work is complete (its results written)."""
    _FINISHED.append(what)


def _stopped(signal: BaseException | None) -> int:
    """Print what a Ctrl-C / SIGTERM that stopped no run kept; return the exit status."""
    what, code = interruption(signal)
    if _main_process():
        line = f"{what} after {_FINISHED[-1]}." if _FINISHED else f"{what[0].lower()}{what[1:]}; nothing was written."
        print(f"\nloft: {line}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``loft`` script; returns the exit status."""
    _FINISHED.clear()
    try:
        status = _run(argv)
    except BaseException:
        _shutdown()
        raise
    try:
        _shutdown()
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM after the command's work: say what it completed
        status = _stopped(e)
    return status


def _shutdown() -> None:
    if "torch" in sys.modules:
        from .launch import shutdown_processes

        shutdown_processes()


def _run(argv: list[str] | None) -> int:
    """The command, its errors and interruptions turned into messages and an exit status."""
    try:
        with sigterm_as_interrupt():  # SIGTERM (kill, docker stop, Slurm) is handled as Ctrl-C: status 143
            status = app(args=argv, standalone_mode=False)
        if isinstance(status, int) and status == 130:  # typer's answer to a KeyboardInterrupt
            return _stopped(None)
        if isinstance(status, int) and status:
            return status
    except LoftUsageError as e:
        if _main_process():  # every rank stops with the same message; print it once
            print(f"loft: error: {e}", file=sys.stderr)
        return 2
    except OutputWriteError as e:
        if _main_process():
            print(f"loft: error: {e}", file=sys.stderr)
        return 1
    except RunInterrupted as e:
        if _main_process():
            print(f"\nloft: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        return _stopped(e)
    except Exception as e:  # click's usage errors (typer vendors its own click)
        names = {c.__name__ for c in type(e).__mro__}
        if "ClickException" in names:
            e.show()
            return int(getattr(e, "exit_code", 2))
        if "Abort" in names:  # click's answer to a KeyboardInterrupt (or Terminated) in a command
            return _stopped(e.__cause__)
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["app", "main"]

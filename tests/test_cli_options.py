"""One definition of the run options (loft/app/config.py): ``loft finetune``'s options are
FinetuneConfig's user-facing fields, and ``loft compare`` shares them exactly."""

from __future__ import annotations

import dataclasses

import typer

from loft.app.cli import app
from loft.app.config import NOT_OPTIONS, FinetuneConfig, compare_fields, finetune_fields, option_fields

COMMAND_FLAGS = {"overwrite", "resume", "quiet"}  # options of the commands, not of a run's settings


def _params(command: str) -> dict:
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params}


def test_every_config_field_is_an_option_or_listed_as_not_user_facing():
    fields = [f.name for f in dataclasses.fields(FinetuneConfig)]
    options = [f.name for f, _ in finetune_fields()]
    assert not set(options) & set(NOT_OPTIONS)
    missing = [name for name in fields if name not in options and name not in NOT_OPTIONS]
    assert not missing, f"FinetuneConfig fields neither options of loft finetune nor in NOT_OPTIONS: {missing}"
    assert set(NOT_OPTIONS) <= set(fields), "NOT_OPTIONS names a field FinetuneConfig does not have"
    assert set(_params("finetune")) == set(options) | COMMAND_FLAGS


def test_finetune_options_carry_the_field_defaults():
    params = _params("finetune")
    for field, spec in finetune_fields():
        param = params[field.name]
        assert param.default == field.default, field.name
        assert param.help == spec.help and list(spec.flags) == [*param.opts, *param.secondary_opts], field.name


def test_compare_shares_finetune_options_exactly():
    finetune, compare = _params("finetune"), _params("compare")
    shared = [f.name for f, _ in compare_fields()]
    assert {"model", "data", "eval_data", "target_modules", "max_steps", "epochs", "head_lr", "batch_size",
            "max_length", "max_eval", "seed", "fsdp", "load_in_4bit", "load_in_8bit", "lr_search_budget"} == set(shared)
    for name in [*shared, "overwrite", "quiet"]:
        a, b = finetune[name], compare[name]
        # the parsed type as click sees it (typer's own type_descriptor exists only from typer 0.21;
        # flwr 1.42, in the federated extra, pins typer < 0.21)
        assert (a.opts, a.secondary_opts, a.default, a.help, a.multiple, repr(a.type)) == (
            b.opts, b.secondary_opts, b.default, b.help, b.multiple, repr(b.type)
        ), f"loft compare's --{name.replace('_', '-')} differs from loft finetune's"
    own = set(compare) - set(shared) - COMMAND_FLAGS
    assert own == {"methods", "ranks", "full", "lrs", "output_dir"}, own


def test_federate_options_come_from_its_config_and_share_finetunes_definitions():
    """``loft federate``'s options are FederateConfig's option fields; the ones it shares with
    ``loft finetune`` take finetune's default, flags and type from FinetuneConfig (one definition)."""
    from loft.app.federated.config import FederateConfig

    federate, finetune = _params("federate"), _params("finetune")
    options = option_fields(FederateConfig)
    assert set(federate) == {f.name for f, _ in options} | {"overwrite", "quiet"}
    ft_fields = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
    shared = [f.name for f, _ in options if f.name in finetune]
    assert set(shared) == {"model", "data", "eval_data", "rank", "batch_size", "max_length", "max_eval", "seed",
                           "lr", "method", "output_dir"}
    for name in shared:
        a, b = federate[name], finetune[name]
        assert (a.opts, a.secondary_opts, repr(a.type)) == (b.opts, b.secondary_opts, repr(b.type)), name
        if name not in ("method", "lr", "output_dir"):  # federate's own: other choices, defaults per method, folder
            assert a.default == b.default == ft_fields[name].default, name
    for field, spec in options:  # every default and help as the config says
        assert federate[field.name].default == field.default and federate[field.name].help == spec.help, field.name


def test_target_modules_are_split_on_commas():
    spec = dict((f.name, s) for f, s in finetune_fields())["target_modules"]
    assert spec.parse(["q,v", " o "]) == ["q", "v", "o"] and spec.parse(None) is None

"""The application layer of loft: the ``loft`` command line and what it runs.

``loft finetune`` / ``loft compare`` / ``loft models`` (:mod:`loft.app.cli`), one fine-tuning run
(:mod:`loft.app.finetune`), comparisons (:mod:`loft.app.compare`), the tasks
(:mod:`loft.app.tasks`), the built-in data sets and models, plots, Trainer callbacks and the
multi-process helpers. It needs the ``[app]`` extra (transformers, PEFT, Accelerate, typer ...).

The core (``import loft``: the optimizer, pairs, clipping, :mod:`loft.integrations`) never
imports this package (docs/architecture.md, "Two layers"). This module imports nothing itself,
so that :mod:`loft.app.command` can check the dependencies before anything heavy is loaded.
"""

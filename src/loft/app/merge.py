"""``loft merge RUN_DIR -o OUT``: a standalone Hugging Face model folder with the run's adapter
merged into the base weights (PEFT's ``merge_and_unload``).

``OUT`` loads with ``AutoModelForCausalLM.from_pretrained(OUT)`` and computes what base +
adapter computes (tested: same logits). It is written into a temporary folder beside ``OUT``
and renamed into place when complete. Like a run's ``--output-dir``, an existing non-empty
``OUT`` is refused; ``--overwrite`` replaces only a folder an earlier ``loft merge`` wrote
(it holds :data:`MERGE_INFO`), never other files.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .. import __version__
from .atomic import publish_dir, write_failure, write_json
from .errors import LoftUsageError, OutputWriteError
from .rundir import is_new_output_dir
from .runmodel import PROMPT_FORMAT_FILE, check_run_dir, load_run

__all__ = ["MERGE_INFO", "check_merge_output", "merge_run"]

#: written into OUT: where the merged model came from
MERGE_INFO = "loft_merge.json"


def check_merge_output(run_dir: Path, out: Path, *, overwrite: bool) -> bool:
    """Whether ``out`` may receive the merged model (reading only); ``True`` when it replaces an
    earlier merge. Refuses a folder inside the run (or holding it) and a non-empty folder
    that ``--overwrite`` does not cover."""
    run, target = run_dir.resolve(), out.expanduser().resolve()
    if target == run or run in target.parents or target in run.parents:
        raise LoftUsageError(f"--output-dir {str(out)!r} overlaps the run folder {str(run_dir)!r}; give a separate "
                             "folder for the merged model.")
    if is_new_output_dir(out, overwrite=overwrite, resume=False, holds="merged model"):
        return False
    if not (out / MERGE_INFO).is_file():
        if overwrite:
            raise LoftUsageError(f"--output-dir {str(out)!r} holds files that loft merge did not write (no {MERGE_INFO}); "
                                 "--overwrite only replaces an earlier merge, so nothing was changed. Choose another "
                                 "--output-dir or empty that folder yourself.")
        raise LoftUsageError(f"--output-dir {str(out)!r} is not empty; nothing was changed. Choose another "
                             "--output-dir.")
    if not overwrite:
        raise LoftUsageError(f"--output-dir {str(out)!r} already holds a merged model; pass --overwrite to replace it, "
                             "or choose another --output-dir.")
    return True


def merge_run(run_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Merge the adapter of the run in ``run_dir`` into its base model and save the result,
    with the run's tokenizer, to ``out``. Returns ``out``."""
    if not str(out).strip():
        raise LoftUsageError("--output-dir is empty; give a folder for the merged model.")
    run_dir, out = Path(run_dir).expanduser(), Path(out).expanduser()
    info = check_run_dir(run_dir, "merge")
    if not info.adapter:
        raise LoftUsageError(f"The run in {str(run_dir)!r} is full fine-tuning (--method full): it already holds the "
                             "whole model; load that folder with AutoModelForCausalLM.from_pretrained, nothing to "
                             "merge.")
    check_merge_output(run_dir, out, overwrite=overwrite)
    from .load import quiet_libraries

    quiet_libraries()
    run = load_run(run_dir, "merge")
    merged = run.model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    try:
        merged.save_pretrained(staging)
        run.tokenizer.save_pretrained(staging)
        if (run_dir / PROMPT_FORMAT_FILE).is_file():
            shutil.copy2(run_dir / PROMPT_FORMAT_FILE, staging / PROMPT_FORMAT_FILE)
        write_json(staging / MERGE_INFO, {"run": str(run_dir), "base_model": run.base_path, "method": run.method,
                                          "task": run.task, "loft_version": __version__})
        staging.chmod(0o755)  # mkdtemp makes it private
        publish_dir(staging, out)
    except Exception as e:
        why = write_failure(e, out.parent)
        if why is None:
            raise
        raise OutputWriteError(f"{why} while writing the merged model beside {str(out)!r}; the partial files were "
                               "removed and --output-dir is unchanged. Make room on that file system first.") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out

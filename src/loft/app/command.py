"""The ``loft`` console script: checks that the application's dependencies are installed, then
runs :func:`loft.app.cli.main`.

``pip install torch-loft`` installs the optimizer alone (torch only); the command line needs
``pip install 'torch-loft[app]'``. Without it the script says so in one line and exits with
status 2 instead of failing with an import traceback.
"""

from __future__ import annotations

import signal
import sys
from importlib.util import find_spec

__all__ = ["main"]

#: the import names the command line needs beyond torch
APP_MODULES = ("typer", "transformers", "peft", "accelerate", "safetensors", "tqdm", "matplotlib")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``loft`` script; returns the exit status."""
    missing = [name for name in APP_MODULES if find_spec(name) is None]
    if missing:
        print(
            f"loft: error: the loft command needs the application extra (missing: {', '.join(missing)}). "
            "Install it with: pip install 'torch-loft[app]'",
            file=sys.stderr,
        )
        return 2
    # bitsandbytes and kernels log, when peft imports them on some CPUs, lines about an optional
    # kernel download that loft's runs never use: keep them off the user's terminal
    from .noise import quiet_library_logs

    quiet_library_logs()
    from .cli import main as cli_main

    status = cli_main(argv)
    # the command is over (its outcome printed): a Ctrl-C during the interpreter's exit would only
    # print a traceback over it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``python -m loft.app ...``: the ``loft`` command (e.g. under ``torchrun`` /
``accelerate launch``, which start a module, not a console script)."""

import sys

from .command import main

sys.exit(main())

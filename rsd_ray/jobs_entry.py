"""Console entry points (pyproject [project.scripts]) that forward to jobs/."""
from __future__ import annotations

import sys


def eval_main() -> None:
    from jobs.eval_libero import main
    sys.exit(main())

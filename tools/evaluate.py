#!/usr/bin/env python
"""Runs `sedd_scale/cli/evaluate.py` from a checkout without installing (installed, it is a console script).

See that module, or --help, for the commands."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sedd_scale.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

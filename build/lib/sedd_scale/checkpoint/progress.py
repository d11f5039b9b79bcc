"""Progress bars with an ETA for long single-process work (conversion, resharding): on stderr, shown only where a
person watches (stderr is a terminal) or when asked (SEDD_PROGRESS=1; SEDD_PROGRESS=0 hides them), and only on rank
0, so CI logs and test output get none."""
from __future__ import annotations

import os
import sys

from tqdm import tqdm


def wanted() -> bool:
    """Whether progress bars are shown in this process."""
    if os.environ.get("RANK", "0") != "0":
        return False
    asked = os.environ.get("SEDD_PROGRESS")
    if asked in ("0", "1"):
        return asked == "1"
    return sys.stderr.isatty()


def bar(total: float, desc: str, unit: str = "B") -> tqdm:
    """A progress bar over `total` units (bytes by default, scaled to KB/MB/GB), disabled unless `wanted()`."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5, disable=not wanted())

"""Third-party warnings and log lines known to be harmless here, silenced in one place so that the project's own
lines (and any warning not listed) stay visible. Installed by the entry points (`python -m sedd_scale.train`,
the conversion tool) before megatron-core and DeepSpeed are imported.

Each entry says why it is harmless; anything not matched is shown as before.
"""
from __future__ import annotations

import logging
import re
import warnings

# (category, message regex, module regex of the warning's origin, why it is harmless)
WARNINGS: list[tuple[type[Warning], str, str, str]] = [
    (UserWarning, r"Transformer Engine and Apex are not installed", r"megatron\.",
     "megatron-core falls back to torch for its own optimizer and FSDP, which this project does not use; whether "
     "Apex/Transformer Engine kernels are used is said once by sedd_scale/accelerators.py"),
    (FutureWarning, r"`torch.distributed.all_gather_into_tensor` is deprecated", r"torch\.distributed",
     "DeepSpeed's ZeRO gathers call the old name, which works in every torch this project supports; renaming the "
     "call is DeepSpeed's to do"),
]

# DeepSpeed's log lines (its "DeepSpeed" logger, WARNING level and up) known to be harmless, by message regex.
DEEPSPEED_LINES: list[tuple[str, str]] = [
    (r"Setting accelerator to CPU",
     "CPU runs are intended (tests, the cpu recipes); each rank's line says its backend (gloo/nccl), and a GPU run "
     "without CUDA fails at the device check instead"),
    (r"You are using ZeRO with an untested optimizer",
     "the optimizer is torch's AdamW under the project's skip-on-non-finite wrapper (distributed/optim.py), "
     "tested under every ZeRO stage by tests/test_trainer.py"),
]


class _KnownLines(logging.Filter):
    """Drops the records whose message matches one of `patterns`."""

    def __init__(self, patterns: list[str]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        """False (dropped) for a known line."""
        return not self.pattern.search(record.getMessage())


def silence_known_noise() -> None:
    """Ignore the WARNINGS and drop the DEEPSPEED_LINES (idempotent); every other warning and line is kept."""
    for category, message, module, _ in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    deepspeed = logging.getLogger("DeepSpeed")  # the logger DeepSpeed creates on import: the same object
    if not any(isinstance(f, _KnownLines) for f in deepspeed.filters):
        deepspeed.addFilter(_KnownLines([pattern for pattern, _ in DEEPSPEED_LINES]))

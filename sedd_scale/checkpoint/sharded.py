"""Our training checkpoint format: one directory per step, written atomically, `latest` written last.

    <root>/latest                   the name of the newest complete checkpoint (atomic replace)
    <root>/step_000001000/meta.json format, step, layout, recipe, counters (written before the rename)
    <root>/step_000001000/...       per-rank shards (DeepSpeed model/optimizer files, rank_XXXXX.pt)

Every rank writes its shards into `<root>/.tmp-step_...`; after a barrier rank 0 adds meta.json and
renames the folder into place, then points `latest` at it and prunes all but the last K. A crash at
any moment leaves the previous checkpoint and pointer intact; leftover `.tmp-*` folders are
incomplete by construction and removed by the next save.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

FORMAT = "sedd-scale/train-v1"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or does not match the run loading it."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def staged_dir(path: Path) -> Iterator[Path]:
    """A fresh temporary sibling of `path` that is renamed to `path` when the block succeeds and removed when
    it fails, so `path` appears whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def step_name(step: int) -> str:
    """The folder name of the checkpoint taken after `step` optimizer steps."""
    return f"step_{step:09d}"


class CheckpointDir:
    """The checkpoints of one run under `root`, keeping the last `keep_last`."""

    def __init__(self, root: str | Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root, self.keep_last = Path(root), keep_last

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None when the run has none yet."""
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / "meta.json").is_file():
            raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete; "
                                  f"point it at a complete step_* folder or delete it to start afresh")
        return path

    def staging(self, step: int) -> Path:
        """The temporary folder every rank writes its shards of `step` into."""
        return self.root / f".tmp-{step_name(step)}"

    def prepare(self, step: int) -> Path:
        """Rank 0, before the shards are written: a fresh, empty staging folder (no stale files)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale)
        staging = self.staging(step)
        staging.mkdir()
        return staging

    def commit(self, step: int, meta: dict) -> Path:
        """Rank 0, after every rank wrote its shards: meta.json, rename into place, `latest`, prune."""
        staging, final = self.staging(step), self.root / step_name(step)
        atomic_write_text(staging / "meta.json", json.dumps({"format": FORMAT, "step": step, **meta}, indent=2))
        if final.exists():  # re-saving a step (e.g. after a resume): swap, never leave a gap
            trash = self.root / f".tmp-old-{final.name}"
            os.rename(final, trash)
            os.rename(staging, final)
            shutil.rmtree(trash)
        else:
            os.rename(staging, final)
        atomic_write_text(self.root / LATEST, final.name)
        for old in sorted(self.root.glob("step_*"))[: -self.keep_last]:
            shutil.rmtree(old)
        return final

    def save(self, step: int, write_shards: Callable[[Path], None], meta: dict, *, rank: int = 0,
             barrier: Callable[[], None] = lambda: None) -> Path:
        """The whole protocol, called on every rank: prepare, write shards, commit (rank 0)."""
        if rank == 0:
            self.prepare(step)
        barrier()
        write_shards(self.staging(step))
        barrier()
        final = self.commit(step, meta) if rank == 0 else self.root / step_name(step)
        barrier()
        return final


def read_meta(path: str | Path) -> dict:
    """meta.json of a checkpoint folder, checked to be ours."""
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a sedd-scale training checkpoint (no meta.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def check_layout(meta: dict, layout: dict) -> None:
    """Refuse to resume a checkpoint written under another parallel layout (it would load wrong shards)."""
    saved = meta.get("layout", {})
    diff = {k: (saved.get(k), v) for k, v in layout.items() if saved.get(k) != v}
    if diff:
        changes = ", ".join(f"{k}: saved {a} vs now {b}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"checkpoint step {meta.get('step')} was written under another layout ({changes}); reshard it first "
            f"(python tools/convert_checkpoint.py reshard RUN_DIR NEW_RUN_DIR --tp {layout.get('tp')} "
            f"--pp {layout.get('pp')} --dp {layout.get('dp')} --zero-stage {layout.get('zero_stage')}), "
            "or resume with the saved layout")

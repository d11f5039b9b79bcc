"""Our training checkpoint format: one directory per step, written atomically, `latest` written last.

    <root>/latest                   the name of the newest complete checkpoint (atomic replace)
    <root>/.lock                    held by the trainer writing the run (`run_lock.py`)
    <root>/step_000001000/meta.json format, step, layout, recipe, counters, and every file's size and
                                    sha256 (written last, before the rename)
    <root>/step_000001000/SHA256SUMS every file's sha256, meta.json's included (`sha256sum -c` format),
                                    so meta.json is checked before it is parsed
    <root>/step_000001000/...       per-rank shards (DeepSpeed model/optimizer files, rank_XXXXX.pt)

Every rank writes its files into `<root>/.tmp-step_...-<run id>` and, last, a list of what it wrote
with sizes and sha256 (`.files/rank_XXXXX.json`). Once every rank has finished (the trainer learns
it through a collective it makes anyway), rank 0 merges those lists into meta.json, renames the
folder into place and points `latest` at it. A crash at any moment leaves the previous checkpoint
and pointer intact; leftover staging folders are incomplete by construction and removed when the
next trainer starts. A re-save of an existing step sets the old folder aside (`.tmp-old-step_*`)
before renaming the new one into place: after a crash between the two renames, the next start puts
the old folder back (it is the only intact copy), and readers name it meanwhile. Pruning old steps
is rank 0's business alone, outside any collective.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sedd_scale.checksums import SUMS_FILE, ChecksumError, file_record, read_sums, write_sums
from sedd_scale.layout import layout_changes, reshard_args

FORMAT = "sedd-scale/train-v2"
# The layout of a step written by the conversion tools: its `state/` folder is a consolidated directory with
# training state, which a run under any TP/PP/DP/ZeRO layout resumes (each rank reads only its slices).
ANY_LAYOUT = "any"
OLD_FORMATS = ("sedd-scale/train-v1",)
LATEST = "latest"
META = "meta.json"
SET_ASIDE = ".tmp-old-"  # + a step folder's name + "-<ns>": the old copy of a step being re-saved
FILES_DIR = ".files"  # each rank's list of written files, merged into meta.json by the commit


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, damaged, or does not match the run loading it."""


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
    it fails, so `path` appears whole or not at all (missing parent folders are created)."""
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


def set_aside_for(path: Path) -> str:
    """The name of the step folder that `path`, a copy set aside by a re-save (`.tmp-old-<name>-<ns>`), was."""
    return path.name.removeprefix(SET_ASIDE).rsplit("-", 1)[0]


def step_of(path: Path) -> int:
    """The step of a step_* folder."""
    return int(path.name.removeprefix("step_"))


class CheckpointDir:
    """The checkpoints of one run under `root`, keeping the last `keep_last`."""

    def __init__(self, root: str | Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root, self.keep_last = Path(root), keep_last

    def steps(self) -> list[Path]:
        """The committed step folders, oldest first."""
        return sorted(p for p in self.root.glob("step_*") if p.is_dir() and (p / "meta.json").is_file())

    def latest(self, *, set_aside_ok: bool = False) -> Path | None:
        """The newest complete checkpoint, or None when the run has none yet.

        When it is missing because a re-save was interrupted, its intact copy set aside is named in the error, or
        returned with `set_aside_ok` (a training start reads it there, then `restore_set_aside` puts it back).
        """
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / META).is_file():
            aside = None if path.exists() else self.set_aside(path.name)
            if aside is not None and set_aside_ok:
                return aside
            if aside is not None:
                raise CheckpointError(f"{pointer} names {path.name}, which is missing: a re-save of it was interrupted "
                                      f"and its intact copy is {aside}; the next training start puts it back, or "
                                      f"rename it yourself: mv {aside} {path}")
            raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete; "
                                  f"point it at a complete step_* folder or delete it to start afresh")
        return path

    def set_aside(self, name: str) -> Path | None:
        """The intact copy of step folder `name` that an interrupted re-save left aside (the newest), or None."""
        copies = sorted(p for p in self.root.glob(f"{SET_ASIDE}{name}-*") if (p / META).is_file())
        return copies[-1] if copies else None

    def restore_set_aside(self) -> list[Path]:
        """Rename back each step folder a re-save set aside and did not replace (rank 0, under the run lock);
        returns the step folders restored."""
        restored = []
        for old in sorted(self.root.glob(f"{SET_ASIDE}step_*")):
            final = self.root / set_aside_for(old)
            if not final.exists() and old == self.set_aside(final.name):
                os.rename(old, final)
                restored.append(final)
        return restored

    def staging(self, step: int, run_id: str) -> Path:
        """The temporary folder every rank writes its files of `step` into (unique to this run's attempt)."""
        return self.root / f".tmp-{step_name(step)}-{run_id}"

    def clean_stale(self) -> list[Path]:
        """Remove what crashed saves left (call while holding the run lock, before saving): staging folders,
        half-pruned steps, and old copies of re-saved steps whose new folder is in place. A step folder set aside
        and not replaced is its only intact copy: it is put back first (`restore_set_aside`), never removed."""
        self.restore_set_aside()
        stale = []
        for path in sorted(self.root.glob(".tmp-*")):
            if path.name.startswith(SET_ASIDE):
                replaced = self.root / set_aside_for(path)
                if not (replaced / META).is_file():  # not superseded by a committed step: keep it
                    continue
            shutil.rmtree(path)
            stale.append(path)
        return stale

    def commit(self, staging: Path, step: int, meta: dict, world_size: int) -> Path:
        """Rank 0, once every rank wrote its files: meta.json with every file's record, rename, `latest`."""
        listed = sorted((staging / FILES_DIR).glob("rank_*.json"))
        if len(listed) != world_size:
            raise CheckpointError(f"checkpoint {staging} has file lists from {len(listed)} of {world_size} ranks: "
                                  "a rank did not finish writing; the previous checkpoint stays latest")
        files: dict[str, dict] = {}
        for path in listed:
            files.update(json.loads(path.read_text()))
        shutil.rmtree(staging / FILES_DIR)
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):  # e.g. DeepSpeed's zero_to_fp32.py
            rel = str(path.relative_to(staging))
            if rel not in files:
                files[rel] = file_record(path)
        meta = {"format": FORMAT, "step": step, **meta, "bytes": sum(r["bytes"] for r in files.values()),
                "files": dict(sorted(files.items())), "sums": SUMS_FILE}
        write_meta(staging, meta)
        final = self.root / step_name(step)
        if final.exists():  # re-saving a step (e.g. after a resume): swap; a crash between the renames is undone
            trash = self.root / f"{SET_ASIDE}{final.name}-{time.time_ns()}"
            os.rename(final, trash)
            os.rename(staging, final)
            shutil.rmtree(trash)
        else:
            os.rename(staging, final)
        self.point_latest(final)
        return final

    def point_latest(self, step_dir: Path) -> None:
        """Make `step_dir` the checkpoint a resume starts from."""
        atomic_write_text(self.root / LATEST, step_dir.name)

    def prune(self) -> list[Path]:
        """Delete all but the newest `keep_last` step folders (never the one `latest` names); returns them."""
        keep = self.latest()
        old = [p for p in self.steps()[: -self.keep_last] if p != keep]
        for path in old:  # renamed first, so a crash midway leaves a .tmp-* folder, never a half step folder
            doomed = path.with_name(f".tmp-pruned-{path.name}")
            os.rename(path, doomed)
            shutil.rmtree(doomed)
        return old

    def roll_back(self, last_good_step: int) -> Path | None:
        """Point `latest` at the newest checkpoint of a step <= `last_good_step`; newer ones are renamed
        `diverged-step_*` (kept, never resumed). None (and nothing changed) when there is no such checkpoint."""
        steps = self.steps()
        good = [p for p in steps if step_of(p) <= last_good_step]
        if not good:
            return None
        for path in steps:
            if step_of(path) > last_good_step:
                os.rename(path, path.with_name(f"diverged-{path.name}"))
        self.point_latest(good[-1])
        return good[-1]


def write_meta(folder: Path, meta: dict) -> None:
    """meta.json, then SHA256SUMS with every file's sha256: meta's records for the files it lists (hashed as
    they were written, not read again) and meta.json's own."""
    atomic_write_text(folder / META, json.dumps(meta, indent=1))
    write_sums(folder, {rel: record["sha256"] for rel, record in meta["files"].items()})


def read_meta(path: str | Path) -> dict:
    """meta.json of a checkpoint folder, checked against SHA256SUMS before it is parsed, and checked to be ours."""
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a sedd-scale training checkpoint (no meta.json)")
    fix = (f"restore the step folder from a copy, or resume from an earlier step_* folder (point "
           f"{path.parent / LATEST} at it)")
    try:
        sums = read_sums(path, fix=fix)
        if sums is not None:
            _check_meta_bytes(path, sums, fix)
        text = meta_path.read_text(encoding="utf-8")
    except ChecksumError as e:
        raise CheckpointError(str(e)) from None
    except UnicodeDecodeError as e:  # a step written before SHA256SUMS was: its damage shows only here
        raise CheckpointError(f"{meta_path} is damaged (not UTF-8: {e}): {fix}") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path} is damaged ({e}): {fix}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} is damaged (not a JSON object): {fix}")
    if sums is None and meta.get("sums"):
        raise CheckpointError(f"{path / SUMS_FILE} is missing (meta.json says it was written): {fix}")
    if sums is not None:
        _check_sums_agree(path, sums, meta, fix)
    if meta.get("format") in OLD_FORMATS:
        raise CheckpointError(f"{meta_path}: format {meta['format']!r} was written by an older sedd-scale whose EMA "
                              f"and data-loader state this version does not read ({FORMAT!r} expected): continue "
                              "that run with the version that wrote it, or start a new run")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _check_meta_bytes(path: Path, sums: dict[str, str], fix: str) -> None:
    """ChecksumError unless meta.json is listed in SHA256SUMS with the sha256 it has."""
    if META not in sums:
        raise ChecksumError(f"{path / SUMS_FILE} is damaged: it does not list {META}; {fix}")
    got = file_record(path / META)["sha256"]
    if got != sums[META]:
        raise ChecksumError(f"{path / META} is damaged: its sha256 is {got[:16]}..., {SUMS_FILE} recorded "
                            f"{sums[META][:16]}... when it was written; {fix}")


def _check_sums_agree(path: Path, sums: dict[str, str], meta: dict, fix: str) -> None:
    """meta.json (intact) and SHA256SUMS list the same files with the same sha256: otherwise SHA256SUMS is damaged."""
    listed = {rel: record["sha256"] for rel, record in meta["files"].items()}
    differ = sorted((set(listed) ^ (set(sums) - {META})) | {r for r in set(listed) & set(sums) if listed[r] != sums[r]})
    if differ:
        raise CheckpointError(f"{path / SUMS_FILE} is damaged: it disagrees with the intact {META} about "
                              f"{differ[:3]}; copy it again from the source, or {fix}")


def check_layout(meta: dict, layout: dict) -> None:
    """Refuse to resume a checkpoint written under another parallel layout (it would load wrong shards)."""
    saved = meta.get("layout", {})
    if saved == ANY_LAYOUT:
        return
    diff = layout_changes(saved, layout)
    if diff:
        changes = ", ".join(f"{k}: saved {a} vs now {b}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"checkpoint step {meta.get('step')} was written under another layout ({changes}); reshard it first "
            f"(python tools/convert_checkpoint.py reshard RUN_DIR NEW_RUN_DIR {reshard_args(layout)}), "
            "or resume with the saved layout")


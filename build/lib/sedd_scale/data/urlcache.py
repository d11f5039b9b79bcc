"""Shards on object storage: URLs fetched whole through webdataset's opener into a local cache.

http(s):// URLs (through curl) and `pipe:` commands (e.g. `pipe:aws s3 cp s3://bucket/x.tar -`)
are opened with `webdataset.gopen`. A file lands in the cache once, under its sha256 (content
addressed: the manifest names it, and two URLs of the same bytes share one copy): downloaded to a
temporary file, its size and sha256 checked against the manifest, then renamed into place. A lock
file per entry makes the ranks and workers of a node that share a cache download each file once.
Cached files are then read like local shards; their sha256 is not checked again (each sequence's
CRC32 still is, on every read: a copy damaged in the cache is named, to be deleted and fetched again).
Nothing is evicted: size the cache for the corpus, or clear it.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

URL_PREFIXES = ("http://", "https://", "pipe:")


class UrlError(ValueError):
    """A URL that could not be fetched, a download that differs from the manifest, or an unusable cache."""


def is_url(location: str) -> bool:
    """Whether `location` is fetched through webdataset's opener rather than read as a local path."""
    return location.startswith(URL_PREFIXES)


def _http_status(url: str) -> str:
    """The server's answer to a HEAD request, to name why a download failed (curl -f only gives an exit code)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as r:
            return f"HTTP {r.status} on a second try: the server failed the download itself"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code} {e.reason}"
    except (urllib.error.URLError, OSError) as e:
        return f"unreachable ({getattr(e, 'reason', e)})"


def _failure(url: str, stream, error: OSError) -> str:
    if stream is None:  # the opener itself could not start (e.g. no curl)
        return f"webdataset's opener failed ({error})"
    if url.startswith("pipe:"):
        return f"the command exited with status {stream.status}"
    return f"{_http_status(url)} (curl exit status {stream.status})"


def _stream_url(url: str, consume) -> None:
    """Feed every block of `url` to consume(block); a failed fetch raises UrlError naming the URL and status."""
    import webdataset as wds

    stream = None
    try:
        stream = wds.gopen(url, "rb")
        while block := stream.read(1 << 20):
            consume(block)
        stream.close()  # waits for curl / the command and raises on a non-zero exit status
    except OSError as e:
        raise UrlError(f"could not fetch {url}: {_failure(url, stream, e)}; check the URL and that the "
                       "object exists, or fetch the dataset to a local directory") from e


def read_url(url: str) -> bytes:
    """The whole content of a URL (a manifest): UrlError if it cannot be fetched."""
    blocks: list[bytes] = []
    _stream_url(url, blocks.append)
    return b"".join(blocks)


def damaged_copy_advice(copies: list[tuple[str | Path, str]]) -> str:
    """What to do when a check fails on files read from the cache, given as (path, sha256 the manifest records):
    delete the copies whose sha256 no longer matches (all of them when none differs), to have them fetched again."""
    bad = [str(path) for path, sha in copies if _file_sha256(path) != sha] or [str(path) for path, _ in copies]
    noun, it, was = ("copy", "it", "it was") if len(bad) == 1 else ("copies", "them", "they were")
    return (f"the cached {noun} {' and '.join(bad)} changed after {was} fetched: delete {it} (the next read "
            f"fetches {it} again and checks the sha256)")


def _file_sha256(path: str | Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return None


class UrlCache:
    """A directory of fetched files named by sha256, shared safely by processes on one machine."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def check_writable(self) -> None:
        """Create the directory and a file in it, or raise UrlError naming it and the fix."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UrlError(f"the shard cache directory {self.root} is not writable ({e.strerror or e}): set "
                           "data.cache_dir (LoaderConfig.cache_dir) or $SEDD_CACHE to a writable local "
                           "directory") from e

    @contextmanager
    def _locked(self, dest: Path) -> Iterator[None]:
        with open(dest.with_name(dest.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            yield

    def fetch(self, url: str, num_bytes: int, sha256: str, suffix: str) -> Path:
        """Local path of the file `url` (which must have `num_bytes` and `sha256`), downloading it once."""
        dest = self.root / f"{sha256}{suffix}"
        if dest.is_file() and dest.stat().st_size == num_bytes:
            return dest
        self.check_writable()
        with self._locked(dest):
            if dest.is_file() and dest.stat().st_size == num_bytes:  # another process fetched it meanwhile
                return dest
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{dest.name}.", suffix=".part")
            try:
                digest, size = hashlib.sha256(), 0
                with os.fdopen(fd, "wb") as out:
                    def consume(block: bytes) -> None:
                        nonlocal size
                        digest.update(block)
                        size += len(block)
                        try:
                            out.write(block)
                        except OSError as e:  # not the URL's fault: say so
                            raise UrlError(f"could not write {url} into the cache {self.root} ({e.strerror or e}): "
                                           "free space there or set data.cache_dir to a larger local disk") from e
                    _stream_url(url, consume)
                if size != num_bytes:
                    raise UrlError(f"{url} gave {size} bytes, the manifest says {num_bytes}: the object is not the "
                                   "one the manifest describes; upload the dataset again or fix the URL")
                if digest.hexdigest() != sha256:
                    raise UrlError(f"{url} has sha256 {digest.hexdigest()}, the manifest says {sha256}: the object "
                                   "changed or was damaged since the manifest was written; upload it again")
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return dest

"""An advisory lock on a run directory, held by the one trainer that writes it.

`<run dir>/.lock` is locked with flock(2) for the life of the run and names the holder (host, pid,
start time). A second trainer on the same directory is refused at once with that information; the
kernel drops the lock when its process dies, so a stale file left by a crash never blocks a restart.
On a filesystem without flock support the lock cannot be taken: the run goes on and says so.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory."""


class RunLock:
    """flock on `<root>/.lock`; `acquire` raises RunDirBusy naming the holder, `release` lets go."""

    def __init__(self, root: str | Path):
        self.path = Path(root) / LOCK_FILE
        self._fd: int | None = None
        self.supported = True

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunDirBusy; idempotent."""
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                holder = _read(fd)
                os.close(fd)
                who = (f"host {holder.get('host')} pid {holder.get('pid')} (since {holder.get('since')})"
                       if holder else "another process")
                raise RunDirBusy(f"run directory {self.path.parent} is in use by {who}: another trainer is writing "
                                 "it. Wait for it to finish or stop it, or choose another checkpoint.dir") from None
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                self.supported = False
                return self
            os.close(fd)
            raise
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Let go of the lock (the file stays; its content is overwritten by the next holder)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    """The holder's record (empty when the file is being rewritten or was never written)."""
    raw = os.pread(fd, 4096, 0)
    try:
        return json.loads(raw.decode()) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}

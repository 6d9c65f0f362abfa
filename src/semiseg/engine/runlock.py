"""One writer per output folder: `train` and `evaluate` hold a lock file in the folder they write.

The lock is an advisory `flock` on `<folder>/.semiseg.lock`, which the kernel releases when its process
dies however it dies, so a crashed run never leaves the folder stuck: the next writer takes the lock
over and says whose it was (the file records pid, host, command and start time). A second writer while
the first is alive is refused, naming the first. Forked children (DataLoader workers) close their copy
of the descriptor at once, so a worker outliving a killed run does not keep its folder locked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import SemisegError

LOCK = ".semiseg.lock"
_HELD: set[int] = set()  # descriptors of the locks this process holds


def _forget_in_child() -> None:
    """After a fork: the child is not the writer, so it drops its copies (the parent's lock stays)."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class FolderBusyError(SemisegError):
    """Another semiseg process is writing into the same output folder."""


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, `{holder.get('command', '?')}`, since {when}"


class FolderLock:
    """`acquire()` before the first write into `folder`, `release()` after the last (also a context manager)."""

    def __init__(self, folder: Path, command: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.command = command
        self._fd: int | None = None
        self._owner = 0  # the pid that acquired it: a forked child never releases its parent's lock

    def _read(self, fd: int) -> dict[str, Any]:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> FolderLock:
        if self._fd is not None:
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                raise FolderBusyError(f"{self.path}: cannot create the lock file ({exc.strerror}); choose another "
                                      "--out") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                message = (f"{self.folder}: another semiseg process is writing into this folder "
                           f"({_describe(holder)}); wait for it to finish, or choose another --out")
                raise FolderBusyError(message) from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                sys.stderr.write(f"note: {self.folder}: the file system does not support locks, so semiseg cannot "
                                 "keep a second writer out of this folder\n")
            try:  # a holder that released the lock meanwhile removed the file: lock the new one instead
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = self._read(fd)
        if previous.get("pid") is not None:
            sys.stderr.write(f"note: {self.folder}: took over the lock of a semiseg process that ended without "
                             f"releasing it ({_describe(previous)})\n")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd, self._owner = fd, os.getpid()
        _HELD.add(fd)
        return self

    def release(self) -> None:
        """Remove the lock file, then unlock (in that order, so a waiting writer re-checks the file)."""
        if self._fd is None or self._owner != os.getpid():
            return
        _HELD.discard(self._fd)
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

"""An exclusive lock that makes one job the owner of its output (a box store, a training run folder).

Two jobs writing the same output at once would mix their results (a store labelled with one job's
parameters holding another's boxes; two training runs interleaving one log and one checkpoint).
:class:`JobLock` takes ``fcntl.flock`` on a lock file for the job's whole life; a second job fails
at once with an error naming the lock file and the holder (pid, host, start time).  The kernel
drops the lock when the holder dies, however it dies, so a killed job never leaves a stale lock.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path


class OutputLockedError(RuntimeError):
    """Another job holds the lock of this output."""


class JobLock:
    """An exclusive ``flock`` on ``path``, held from :meth:`acquire` to :meth:`release` (or a ``with`` block).

    Args:
        path: the lock file (created if needed, removed on release).
        what: the kind of job, for the error message ("proposals job", "training run").

    The lock file holds the holder's pid, host and start time.  It is removed on release while
    still locked; a job whose freshly locked file was meanwhile removed (an inode check) starts
    over on the new file, so two jobs never both hold the lock.
    """

    def __init__(self, path: str | os.PathLike, what: str = "job") -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "JobLock":
        """Take the lock.

        Raises:
            OutputLockedError: another process holds it (the message names the file and the holder).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                try:
                    holder = self.path.read_text().strip() or "unknown"
                except OSError:
                    holder = "unknown"
                raise OutputLockedError(f"{self.path} is locked by another {self.what} ({holder}); wait for it to "
                                        f"finish or stop it (two jobs must not write the same output)") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and flock
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode())
            self._fd = fd
            return self
        raise OutputLockedError(f"cannot take the lock {self.path} (it keeps being replaced)")

    def release(self) -> None:
        """Remove the lock file and drop the lock (a no-op if not held)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it (see acquire's inode check)
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> "JobLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

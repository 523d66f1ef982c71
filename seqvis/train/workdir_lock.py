"""One owner per workdir: a second run started on a workdir that a first one is training in is refused.

The lock is an exclusive ``fcntl.flock`` on ``WORKDIR/.lock`` (``.lock.<i>`` for process ``i > 0`` of a
multi-host run), held from the config check to the end of the run. The kernel releases it when the
process ends, however it ends (an exit, an exception, SIGKILL, a crashed host's NFS lease expiring), so
a lock left by a dead run never blocks the next one: the file stays, the lock does not. While held,
the file says who holds it (pid, host, start time, command), which is what the refusal reports; the
owner empties it when it lets go.

Where the file system has no locks (some FUSE mounts, object stores) the run goes on with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time

from seqvis.errors import ConfigError

log = logging.getLogger(__name__)


def check_workdir_path(workdir: str) -> None:
    """A workdir that cannot be one: an existing file, or a path under a file."""
    path = os.path.abspath(workdir)
    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        what = "is an existing file" if parent == path else f"is under {parent}, which is a file"
        raise ConfigError(f"--workdir={workdir} {what}, not a directory; give a directory (new or a run's "
                          "workdir), e.g. --workdir=workdirs/run1.")


class WorkdirLock:
    """``with WorkdirLock(workdir):`` owns ``workdir`` for the block (creating the directory)."""

    def __init__(self, workdir: str, process_index: int = 0):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, ".lock" if process_index == 0 else f".lock.{process_index}")
        self._fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        check_workdir_path(self.workdir)
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise ConfigError(
                f"--workdir={self.workdir} is in use by another run ({owner}). Two runs in one workdir would "
                "train into the same checkpoints and metrics. Wait for that run to end (or stop it; a re-run of "
                "the same command then resumes), or use another --workdir.") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            log.warning("No lock on %s (the file system has none: %s); make sure no other run uses this workdir.",
                        self.workdir, e.strerror)
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                  "command": " ".join(sys.argv)[:500]}).encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the descriptor releases the flock


def _read_owner(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "its owner is still starting"
    return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}"

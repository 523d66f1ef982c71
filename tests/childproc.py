"""Running a command from a test: a child that hangs fails the test with the child's own stacks.

``subprocess.run(..., timeout=...)`` is not enough for that. On timeout it kills the child but then
waits for the output pipes to close; a grandchild holding them (a data-loading or compiler process)
keeps the test waiting past any limit. The stacks it would report are also the parent's, which is
waiting on a pipe. One CI run hung that way for over an hour on a child stuck at exit.

So the child runs in its own session with faulthandler on (``PYTHONFAULTHANDLER``). On timeout, its
whole process group gets SIGABRT, so every Python process in it prints all its threads' stacks,
and then SIGKILL. The test fails with the command and the end of its stderr. The timeout stays
under pytest.ini's per-test ``timeout`` (600 s), so this fires first.
"""
import os
import signal
import subprocess

import pytest

DEFAULT_TIMEOUT = 480


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def run(cmd, *, timeout: float = DEFAULT_TIMEOUT, env=None, **kw) -> subprocess.CompletedProcess:
    """Like ``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)``; a timeout fails the test."""
    env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        pass
    _killpg(proc.pid, signal.SIGABRT)  # faulthandler prints each process's stacks to its stderr
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        out, err = "", "(no output: the process group did not end on SIGABRT)"
    _killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
    proc.wait()
    pytest.fail(f"{' '.join(map(str, cmd))[:300]}\nstill running after {timeout:.0f} s; its stacks "
                f"(SIGABRT) and the end of its stderr:\n{(err or '')[-8000:]}", pytrace=False)

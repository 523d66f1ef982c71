"""SIGTERM, as a preemptible VM or a cluster scheduler sends it before stopping a job: save, then stop.

``with Preemption() as p:`` around the training loop; ``p.reached(step)`` after each step says whether to
save at that step and stop. One process: a SIGTERM handler sets a flag (the default action, ending the
process at once, is restored when the block ends). Several processes (``jax.distributed``): the hosts must
agree on the step to save at, since a save is collective; jax's distributed runtime watches for SIGTERM
itself and ``orbax.checkpoint.multihost.reached_preemption(step)`` is true at the same step on every host.
"""

from __future__ import annotations

import signal
import threading

import jax


class Preemption:
    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        self.signal_name = "SIGTERM"

    def __enter__(self) -> "Preemption":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            from orbax.checkpoint import multihost

            return bool(multihost.reached_preemption(step))
        return self._flag.is_set()

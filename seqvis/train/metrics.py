"""Metric output: ``workdir/metrics.jsonl``, TensorBoard event files, and terminal progress.

Only process 0 writes (the writer is a no-op elsewhere). TensorBoard files are written with
``tf.summary`` (TensorFlow is already a dependency of the data pipeline).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from typing import Any


def _scalar(v: Any) -> float:
    v = float(v)
    return v if math.isfinite(v) else float("nan")


def _is_eval(keys) -> bool:
    """An evaluation row: a key other than the training metrics' ``train/...`` (``eval/``, ``fewshot/``, the
    named evaluators' ``<name>/``; see seqvis.train.evaluators)."""
    return any(k != "step" and not k.startswith("train/") for k in keys)


def _kept(step: int, is_eval: bool, resume_step: int, total_steps: int | None) -> bool:
    """Whether a row logged at ``step`` survives a resume at ``resume_step`` (see :func:`truncate_jsonl`)."""
    return step < resume_step or (step == resume_step and not (is_eval and resume_step == total_steps))


def truncate_jsonl(path: str, resume_step: int, total_steps: int | None = None) -> int:
    """Keep the rows of ``path`` that a run resumed at ``resume_step`` will not write again.

    Training rows up to ``resume_step`` were logged before that step's checkpoint was saved
    and are kept; rows after it belong to the lost part of the run and are dropped. Evaluation
    rows at ``resume_step`` are kept, except the final evaluation (``resume_step ==
    total_steps``), which the re-run repeats. Unparseable lines (a write cut short) go too.
    Returns the number of rows dropped; the file is replaced atomically.
    """
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if _kept(step, _is_eval(row), resume_step, total_steps):
                kept.append(json.dumps(row) + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


ORPHANED_TB_DIR = "tensorboard.orphaned"


def truncate_tensorboard(logdir: str, resume_step: int, total_steps: int | None = None) -> list[str]:
    """The TensorBoard event files under ``logdir`` as a run resumed at ``resume_step`` leaves them.

    The same rows as :func:`truncate_jsonl` are dropped (scalars after ``resume_step``, and the final
    evaluation when it is repeated), so the resumed run writes each step once and no reader (TensorBoard's
    Python loader, its Rust data server, ``summary_iterator``) shows two curves. Nothing is deleted: each
    event file that held dropped events is kept whole in ``<workdir>/tensorboard.orphaned/`` (outside the
    log directory, renamed ``...orphaned-events...`` so TensorBoard does not load it as a run) and replaced
    in place by a copy of its kept records, byte for byte. A record cut short by a killed writer ends the
    file's readable part. Returns the paths the originals were kept at.

    Why not TensorBoard's own purge (an event with ``SessionLog.START`` at the resumed step, honoured with
    ``--purge_orphaned_data``): only its Python loader reads that event. Its Rust data server (used when
    ``tensorboard-data-server`` is installed, as here) drops a tag's later points only when that tag is
    written again at an earlier step, so a tag the resumed run never rewrites would keep its orphaned points.
    """
    if not os.path.isdir(logdir):
        return []
    files = sorted(os.path.join(d, n) for d, _, names in os.walk(logdir) for n in names if "tfevents" in n)
    if not files:
        return []
    import tensorflow as tf
    from google.protobuf.message import DecodeError
    from tensorflow.core.util import event_pb2

    workdir = os.path.dirname(os.path.abspath(logdir))
    orphaned = os.path.join(workdir, ORPHANED_TB_DIR)
    kept_aside = []
    for path in files:
        records, dropped = [], 0
        try:
            for raw in tf.data.TFRecordDataset(path):
                raw = raw.numpy()
                event = event_pb2.Event.FromString(raw)
                if event.HasField("summary") and event.summary.value:
                    is_eval = _is_eval([v.tag for v in event.summary.value])
                    if not _kept(int(event.step), is_eval, resume_step, total_steps):
                        dropped += 1
                        continue
                records.append(raw)
        except (tf.errors.DataLossError, DecodeError):  # a record cut short (or garbled) by a killed writer
            dropped += 1
        if not dropped:
            continue
        os.makedirs(orphaned, exist_ok=True)
        rel = os.path.relpath(path, logdir).replace(os.sep, "__").replace("tfevents", "orphaned-events")
        tmp = os.path.join(orphaned, f".rewriting.{rel}")  # not in the log directory, not named as an event file
        with tf.io.TFRecordWriter(tmp) as w:
            for raw in records:
                w.write(raw)
        dest = os.path.join(orphaned, f"resumed-at-{resume_step}.{rel}")
        n = 1
        while os.path.exists(dest):
            dest = os.path.join(orphaned, f"resumed-at-{resume_step}.{n}.{rel}")
            n += 1
        try:  # the original stays whole until its filtered copy has replaced it
            os.link(path, dest)
        except OSError:
            shutil.copy2(path, dest)
        os.replace(tmp, path)
        with open(os.path.join(orphaned, "README.txt"), "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} resumed at step {resume_step}: "
                    f"{os.path.relpath(path, workdir)} -> {os.path.basename(dest)} (the whole file; {dropped} "
                    "record(s) after the resumed step, or cut short, left out of the copy TensorBoard reads). "
                    "Rename it back (orphaned-events -> tfevents) to view it.\n")
        kept_aside.append(dest)
    return kept_aside


class MetricWriter:
    """``resume_step``: the step training restarts from; rows the resumed run will write again
    are removed first, so metrics.jsonl holds each step once."""

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True, resume_step: int = 0,
                 total_steps: int | None = None):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        truncate_jsonl(path, resume_step, total_steps)
        # TensorBoard's files too (whether or not this run writes any), before this run's file exists.
        truncate_tensorboard(os.path.join(workdir, "tensorboard"), resume_step, total_steps)
        self._jsonl = open(path, "a", buffering=1)
        if tensorboard:
            import tensorflow as tf

            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {f"{prefix}{k}": _scalar(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **row}) + "\n")
        if self._tb is not None:
            import tensorflow as tf

            with self._tb.as_default(step=int(step)):
                for k, v in row.items():
                    tf.summary.scalar(k, v)

    def flush(self) -> None:
        """Everything written so far reaches the files (the trainer calls it before each checkpoint:
        what a resume keeps is then on disk, in metrics.jsonl and in TensorBoard's files)."""
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class Progress:
    """A one-line progress bar with ETA on a TTY; plain periodic lines otherwise."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream=None, every: int = 100):
        self.total, self.start = total, start
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = max(1, every)
        self.t0 = time.time()

    def update(self, step: int, info: dict[str, float]) -> None:
        if not self.enabled:
            return
        done = step - self.start
        elapsed = time.time() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        text = " ".join(f"{k}={v:.4g}" for k, v in info.items())
        if self.tty:
            width = 30
            fill = int(width * step / max(self.total, 1))
            bar = "#" * fill + "-" * (width - fill)
            eta_s = _fmt_time(eta) if math.isfinite(eta) else "--:--"
            self.stream.write(f"\r[{bar}] {step}/{self.total} {_fmt_time(elapsed)}<{eta_s} {text}\033[K")
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            eta_s = _fmt_time(eta) if math.isfinite(eta) else "?"
            self.stream.write(f"step {step}/{self.total} elapsed {_fmt_time(elapsed)} eta {eta_s} {text}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

"""Metrics out of the training loop: one JSONL logger and one progress bar.

The logger has the small interface of torchtune's metric loggers (``log_dict``, ``close``) and
writes one JSON object per line, flushed at once, so a killed run leaves whole lines. A
checkpoint records ``logger.offset()``; resuming truncates the file back to it, so records
written after the checkpoint by the killed run do not appear twice.

With ``--log-to tensorboard`` every record also goes to TensorBoard event files
(:class:`TensorBoardLog`), one run per schedule, written locally by
``torch.utils.tensorboard.SummaryWriter``.

Only rank 0 writes; the other ranks get a logger that drops everything.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path


class TensorBoardLog:
    """Metrics records as TensorBoard scalars: ``<root>/<schedule>/`` per schedule (so that
    TensorBoard overlays the baseline and the V-cycle), x axis = the schedule's optimizer step.
    Tags: ``train/loss``, ``val/loss``, ``train/lr``, ``train/tok_per_s``, ``train/mfu``,
    ``progress/tokens``, ``progress/flops``, ``progress/wall``, ``vcycle/level`` (at every train
    record, so a transition is a step in that curve) and, at every stage start, ``vcycle/stage`` and a
    text entry ``vcycle/transition`` (stage, level, phase, steps, lr scale, optimizer). A resumed
    run passes ``resume_at=(schedule, step)``: that schedule's events from ``step`` on, written
    by the killed run after its checkpoint, are purged."""

    SCALARS = {"loss": "train/loss", "val_loss": "val/loss", "lr": "train/lr",
               "tok_per_s": "train/tok_per_s", "mfu": "train/mfu", "tokens": "progress/tokens",
               "flops": "progress/flops", "wall": "progress/wall", "level": "vcycle/level"}

    def __init__(self, root: Path, resume_at: tuple[str, int] | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self._make, self.root, self.resume_at = SummaryWriter, Path(root), resume_at
        self._writers: dict[str, object] = {}

    def _writer(self, schedule: str):
        if schedule not in self._writers:
            purge = self.resume_at[1] if self.resume_at and self.resume_at[0] == schedule else None
            self._writers[schedule] = self._make(str(self.root / schedule), purge_step=purge)
        return self._writers[schedule]

    def log_dict(self, record: dict) -> None:
        w, step = self._writer(str(record.get("schedule", "run"))), int(record.get("step", 0))
        event = record.get("event")
        keys = {"train": tuple(k for k in self.SCALARS if k != "val_loss"),
                "eval": ("val_loss",)}.get(event, ())
        for key in keys:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                w.add_scalar(self.SCALARS[key], value, step)
        if event == "stage":
            w.add_scalar("vcycle/stage", record.get("stage", 0), step)
            w.add_text("vcycle/transition",
                       f"stage {record.get('stage')}: level {record.get('level')} "
                       f"({record.get('phase') or 'baseline'}), {record.get('steps')} steps, lr x "
                       f"{record.get('lr_scale')}, optimizer {record.get('optimizer')}", step)
        w.flush()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers = {}


class MetricLogger:
    def __init__(self, path: Path | None, *, truncate_to: int | None = None,
                 tensorboard: TensorBoardLog | None = None):
        self.path = path
        self._f = None
        self._tb = tensorboard
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_to is not None and path.exists():
            with path.open("r+b") as f:
                f.truncate(truncate_to)
        self._f = path.open("ab")

    def log_dict(self, record: dict) -> None:
        if self._f is None:
            return
        line = json.dumps({k: _plain(v) for k, v in record.items()}, allow_nan=False)
        self._f.write(line.encode() + b"\n")
        self._f.flush()
        if self._tb is not None:
            self._tb.log_dict(record)

    def offset(self) -> int:
        if self._f is None:
            return 0
        self._f.flush()
        os.fsync(self._f.fileno())
        return self._f.tell()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(v):
    """JSON-safe value: floats that are not finite become strings ("nan", "inf")."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


class ProgressBar:
    """A tqdm bar on stderr (step, level, loss, tokens/s); silent when not a TTY or --quiet."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            try:
                sized = os.get_terminal_size(sys.stderr.fileno()).columns > 0
            except OSError:
                sized = False
            # a terminal that reports a 0 x 0 size (a bare pty) would get no bar at all
            self._bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr,
                             dynamic_ncols=sized, ncols=None if sized else 100,
                             nrows=None if sized else 24, leave=True)

    @property
    def active(self) -> bool:
        return self._bar is not None

    def update(self, step: int, level: int, loss: float, tok_s: float) -> None:
        if self._bar is None:
            return
        self._bar.n = step
        self._bar.set_postfix_str(f"level={level} loss={loss:.4f} tok/s={tok_s:,.0f}",
                                  refresh=False)
        self._bar.refresh()

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

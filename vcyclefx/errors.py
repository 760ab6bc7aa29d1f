"""Errors raised by vcyclefx.

Every error is a :class:`VCycleError`; the message names what is at fault (the node, the op,
the space, the file or the option) and, where there is one, the fix.
"""

from __future__ import annotations

import os
import traceback

__all__ = [
    "VCycleError",
    "CaptureError",
    "UnsupportedOp",
    "AnalysisError",
    "PlanError",
    "MappingError",
    "LevelError",
    "ExportError",
    "ScheduleError",
    "PassCheckError",
    "SelfCheckError",
]

DUMP_ENV = "VCYCLEFX_DUMP"
"""Environment variable: a file that errors built from an upstream exception (torch.export,
the ONNX exporter, a rule) append the full upstream text to, with the graph where there is one;
the message itself stays short and says where the dump is."""


class VCycleError(Exception):
    """Base class of every error raised by vcyclefx.

    A message longer than :data:`MAX_LINES` lines (or with a line over :data:`MAX_LINE`
    characters) is cut to its head and tail, which name the node and the fix; the whole of it
    goes to ``$VCYCLEFX_DUMP`` where that is set (a safety net: messages are built short)."""

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            args = (_readable(args[0], type(self).__name__),)
        super().__init__(*args)


MAX_LINES, MAX_LINE = 20, 500


def _readable(message: str, kind: str) -> str:
    lines = message.splitlines()
    if len(lines) <= MAX_LINES and all(len(ln) <= MAX_LINE for ln in lines):
        return message
    cut = [ln if len(ln) <= MAX_LINE else ln[: MAX_LINE - 3] + "..." for ln in lines]
    if len(cut) > MAX_LINES:
        head, tail = cut[: MAX_LINES - 6], cut[-4:]
        cut = [*head, f"... ({len(cut) - len(head) - len(tail)} lines left out)", *tail]
    return "\n".join([*cut, dump_note(f"{kind} (message in full)", None, message)])


class CaptureError(VCycleError):
    """A model could not be captured as a graph (names the front-end, the reason, what to try)."""


class UnsupportedOp(VCycleError):
    """A graph node uses an op that has no rule in the op registry."""


class AnalysisError(VCycleError):
    """The analysis found something inconsistent (names the node)."""


class PlanError(VCycleError):
    """A width/depth request cannot be planned on this model (names the option and the space)."""


class MappingError(VCycleError):
    """A mapping does not fit the model it is applied to, or its file is corrupt."""


class LevelError(VCycleError):
    """A level directory or a level module is not what vcyclefx expects."""


class CheckpointError(LevelError):
    """A checkpoint's files (safetensors shards, their index) are missing, truncated or disagree
    with its config, or an output shard could not be written (names the file and the tensor)."""


class ExportError(VCycleError):
    """A level could not be exported (names the op/node and the exporter's report)."""


class ScheduleError(VCycleError):
    """A V-cycle schedule is invalid (zero steps, too many levels, alpha out of range, ...)."""


class PassCheckError(VCycleError):
    """A pass's result failed the check that runs after every pass (a bug in vcyclefx or in a
    registered rule: the message names the pass and the node or tensor)."""


class SelfCheckError(VCycleError):
    """A transform that must keep the function did not (or a coalesced level's outputs went
    non-finite): the message names the first node whose values diverge, its op, the relative
    error and the resized spaces of its axes; the same are attributes (``node``, ``op``,
    ``error``, ``space``). A bug in vcyclefx or in a registered op rule."""

    def __init__(self, message: str, *, node=None, op=None, error=None, space=""):
        super().__init__(message)
        self.node, self.op, self.error, self.space = node, op, error, space


def brief(e: BaseException, limit: int = 300) -> str:
    """``"<type>: <first non-empty line>"`` of an upstream exception, at most ``limit``
    characters: what a message built from another library's exception quotes of it (torch's
    messages can hold a whole printed graph)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dump_note(what: str, e: BaseException | None = None, extra: str = "") -> str:
    """Append ``what``, the full text of ``e`` (its traceback and causes) and ``extra`` (a graph,
    a log) to the file named by ``$VCYCLEFX_DUMP`` and say so; without the variable, say how
    to get the dump. The sentence is meant for the end of an error message."""
    path = os.environ.get(DUMP_ENV)
    if not path:
        return f"(set {DUMP_ENV}=FILE to write the full upstream error and graph to a file)"
    text = "".join(traceback.format_exception(e)) if e is not None else ""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"==== vcyclefx: {what}\n{text}\n{extra}\n")
    except OSError as err:
        return f"({DUMP_ENV}={path} could not be written: {err.strerror})"
    return f"(full upstream error and graph written to {path})"

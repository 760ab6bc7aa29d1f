"""Errors raised by vcyclefx.

Every error is a :class:`VCycleError`; the message names what is at fault (the node, the op,
the space, the file or the option) and, where there is one, the fix.
"""

from __future__ import annotations

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


class VCycleError(Exception):
    """Base class of every error raised by vcyclefx."""


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

"""vcyclefx: multi-level (V-cycle) training for any PyTorch model by torch.fx graph rewriting.

Public API (a contract; see DESIGN.md)::

    small, mapping = vf.coalesce(model, example_inputs, width=0.5, depth=0.5)
    restored, _ = vf.decoalesce(small, mapping=mapping)
    mixed = vf.interpolate(before, restored, alpha=0.25)
    report = vf.inspect(model, example_inputs)
    vf.export_onnx(level, example_inputs, "level.onnx", check=True)
    cycle = vf.VCycle(model, example_inputs, levels=2, width=0.5, depth=0.5, alpha=0.25)
"""

import importlib

from vcyclefx.analysis.registry import register_rule
from vcyclefx.capture import capture  # the package vcyclefx.capture is shadowed by its function
from vcyclefx.export import leveldir as _leveldir  # registers how a Level pickles
from vcyclefx.errors import (
    AnalysisError,
    CaptureError,
    CheckpointError,
    ExportError,
    LevelError,
    MappingError,
    PlanError,
    ScheduleError,
    SelfCheckError,
    UnsupportedOp,
    VCycleError,
)
from vcyclefx.plan.mapping import Mapping

# The rest of the API is loaded on first use (PEP 562), so that `import vcyclefx` and the CLI
# do not pay for modules a command does not need.
_LAZY = {
    "coalesce": "api", "decoalesce": "api", "interpolate": "api",
    "inspect": "analysis.report", "Report": "analysis.report",
    "export_onnx": "export.onnx",
    "VCycle": "train.vcycle", "Stage": "train.vcycle", "Schedule": "train.vcycle",
    "training_flops_per_token": "train.flops",
    "to_module": "export.module",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vcyclefx' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "coalesce",
    "decoalesce",
    "interpolate",
    "capture",
    "inspect",
    "export_onnx",
    "VCycle",
    "Stage",
    "Schedule",
    "training_flops_per_token",
    "Report",
    "Mapping",
    "to_module",
    "register_rule",
    "VCycleError",
    "CaptureError",
    "UnsupportedOp",
    "AnalysisError",
    "PlanError",
    "MappingError",
    "LevelError",
    "CheckpointError",
    "ExportError",
    "ScheduleError",
    "SelfCheckError",
]

"""vcyclefx: multi-level (V-cycle) training for any PyTorch model by torch.fx graph rewriting.

Public API (a contract; see DESIGN.md)::

    small, mapping = vf.coalesce(model, example_inputs, width=0.5, depth=0.5)
    restored, _ = vf.decoalesce(small, mapping=mapping)
    mixed = vf.interpolate(before, restored, alpha=0.25)
    report = vf.inspect(model, example_inputs)
    vf.export_onnx(level, example_inputs, "level.onnx", check=True)
    cycle = vf.VCycle(model, example_inputs, levels=2, width=0.5, depth=0.5, alpha=0.25)
"""

from .api import coalesce, decoalesce, interpolate
from .capture import capture
from .errors import (
    AnalysisError,
    CaptureError,
    ExportError,
    LevelError,
    MappingError,
    PlanError,
    ScheduleError,
    UnsupportedOp,
    VCycleError,
)
from .mapping import Mapping
from .onnx_export import export_onnx
from .registry import register_rule
from .report import Report, inspect
from .vcycle import Schedule, Stage, VCycle
from .flops import training_flops_per_token

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
    "register_rule",
    "VCycleError",
    "CaptureError",
    "UnsupportedOp",
    "AnalysisError",
    "PlanError",
    "MappingError",
    "LevelError",
    "ExportError",
    "ScheduleError",
]

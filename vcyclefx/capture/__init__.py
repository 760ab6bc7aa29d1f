"""Capture: a model and its example inputs to a Level (torch.export with dynamic batch/sequence
dims, or torch.fx.symbolic_trace for plain modules); MODEL specs; how the model is built."""

from vcyclefx.capture.frontend import as_level, capture

__all__ = ["as_level", "capture"]

"""The built-in op rules (importing this package registers them)."""

from . import linalg, misc, pointwise, recurrent, reduce, reparam, routing, shape  # noqa: F401

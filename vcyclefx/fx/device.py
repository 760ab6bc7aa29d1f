"""Device literals of a captured graph follow the module's device.

Export records the device of factory ops and casts as literal arguments (``arange(T,
device=cpu)``, ``_assert_tensor_metadata(x, device=cpu)``), so a level captured on the CPU and
moved with ``.to("cuda")`` would still make CPU tensors. After every ``.to()/.cuda()/.cpu()``
a level rewrites those literals to the device its weights are now on.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from vcyclefx.fx.args import get_arg, set_arg


def _device_args(target) -> list[str]:
    schema = getattr(target, "_schema", None)
    if schema is None:
        return []
    return [a.name for a in schema.arguments if "Device" in str(a.type)]


def move_device_literals_(gm: GraphModule, device: torch.device) -> bool:
    """Rewrite every device literal of ``gm`` (and its higher-order-op bodies) to ``device``;
    returns whether anything changed. In place: it is what ``level.to(...)`` calls."""
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for name in _device_args(node.target):
            value = get_arg(node, name, None)
            if value is None:
                continue
            if torch.device(value) != device:
                set_arg(node, name, device)
                changed = True
    for sub in gm.children():
        if isinstance(sub, GraphModule) and move_device_literals_(sub, device):
            sub.recompile()
    if changed:
        gm.recompile()
    return changed


def module_device(gm: torch.nn.Module) -> torch.device | None:
    for t in list(gm.parameters()) + list(gm.buffers()):
        return t.device
    return None

"""FLOP accounting from the graph: forward + backward, counted by torch.utils.flop_counter.

Only what the counter counts is counted (matrix products, convolutions, attention); norms and
elementwise ops are left out, as in the usual 6N + attention estimate.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_flash(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# The CPU attention kernels are not in torch's FLOP registry; count them like the CUDA ones
# (full T x T score matrix, forward 2 matmuls, backward 4).
_EXTRA = {}
for _name, _fn in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash),
                   ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_backward)):
    _op = getattr(aten, _name, None)
    if _op is not None:
        _EXTRA[_op] = _fn  # the counter looks ops up by overload packet


def _as_tuple(example_inputs) -> tuple:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def tokens_in(example_inputs) -> int:
    """Tokens in a batch: batch x sequence for integer (token) inputs, else the batch size."""
    x = _as_tuple(example_inputs)[0]
    if not x.dtype.is_floating_point and x.dim() >= 2:
        return int(x.shape[0] * x.shape[1])
    return int(x.shape[0])


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, (list, tuple)):
        return next(_first_tensor(v) for v in out if isinstance(v, (torch.Tensor, list, tuple)) or hasattr(v, "logits"))
    raise TypeError(f"cannot find a tensor in the output of type {type(out).__name__}")


def output_sum(out, inputs: tuple) -> torch.Tensor:
    """The default loss of :func:`training_flops`: the sum of the first output tensor (a
    ModelOutput's ``logits``); the loss itself does no counted work, any loss gives the same
    count unless it multiplies matrices."""
    return _first_tensor(out).float().sum()


def training_flops(module: torch.nn.Module, example_inputs, loss=None) -> int:
    """FLOPs of one forward + backward pass of ``module`` on ``example_inputs`` (a tuple, or
    one tensor), backward from ``loss(output, inputs)`` (default :func:`output_sum`).

    Side-effect free: the module keeps its mode (switching a level's mode would regenerate its
    code and make torch.compile recompile), the RNG is forked (dropout draws do not shift the
    caller's random stream, on the CPU or the inputs' GPU) and the gradients are returned by
    ``torch.autograd.grad``: nothing accumulates into ``.grad`` (where DDP's hooks sit)."""
    inputs = _as_tuple(example_inputs)
    loss = output_sum if loss is None else loss
    params = [p for p in module.parameters() if p.requires_grad]
    gpus = [x.device for x in inputs if isinstance(x, torch.Tensor) and x.device.type == "cuda"]
    with torch.random.fork_rng(devices=gpus[:1]), \
            FlopCounterMode(display=False, custom_mapping=_EXTRA) as counter:
        value = loss(module(*inputs), inputs)
        if params:
            torch.autograd.grad(value, params, allow_unused=True)
    return int(counter.get_total_flops())


def training_flops_per_token(module: torch.nn.Module, example_inputs, loss=None) -> float:
    """Training (forward + backward) FLOPs per token of ``module`` at the example's shape."""
    return training_flops(module, example_inputs, loss) / tokens_in(example_inputs)

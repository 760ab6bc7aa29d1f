"""Training-step time of a vcyclefx level against the hand-written module it came from.

    python tools/bench_compile.py                       # CPU: eager only (see below)
    python tools/bench_compile.py --device cuda         # eager and torch.compile, bf16 autocast
    python tools/bench_compile.py --preset gpt2 --device cuda --batch 16

The level is the level-0 GraphModule made by ``vcyclefx.capture.capture(GPT(cfg), (idx,))``;
the hand-written module is that GPT itself (a copy with the same weights). With ``--level 1``
the level is that GraphModule coalesced (``vf.coalesce(level, width=0.5, depth=0.5)``) and the
hand-written module a GPT of the smaller sizes loaded with the level's weights. One training step =
forward + cross-entropy + backward + AdamW step + zero_grad. Each (module, mode) pair gets its
own optimizer and warm-up steps (compilation happens there), then ``--repeats`` rounds of
``--steps`` steps are timed **interleaved** (round r times every pair once, in rotating order),
so a change of machine load during the run hits all pairs alike. Reported: the median over
rounds of the mean step time, and level / hand-written for each mode; the target is a ratio
within 1.05.

On CPU, compiled is off by default: inductor's C++ compile takes minutes on a 2-core machine
before the first step, which makes the comparison impractical there; measure compiled on a GPU
(``--device cuda``), or force it on CPU with ``--compile``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vcyclefx.capture.frontend import capture  # noqa: E402
from vcyclefx.zoo.gpt import GPT, GPTConfig  # noqa: E402

PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, seq_len=128, batch=32),
    "small": dict(n_layer=6, n_head=6, n_embd=384, seq_len=256, batch=16),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, seq_len=1024, batch=8),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="tiny")
    for name in ("n_layer", "n_head", "n_embd", "seq_len", "batch"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"override the preset's {name}")
    p.add_argument("--level", type=int, choices=[0, 1], default=0,
                   help="0: the captured model against GPT; 1: the model coalesced with --width/"
                        "--depth against a GPT built at those smaller sizes")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--depth", type=float, default=0.5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile'd modules (default: on CUDA only)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per pair (compiles)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU)")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


class Pair:
    """One module in one mode, with its own optimizer and step function."""

    def __init__(self, name: str, mode: str, module: torch.nn.Module, device, autocast_dtype):
        self.name, self.mode, self.times = name, mode, []
        self.module = module.to(device).train()
        self.fn = torch.compile(self.module) if mode == "compiled" else self.module
        self.opt = torch.optim.AdamW(self.module.parameters(), lr=1e-4,
                                     fused=device.type == "cuda")
        self.device, self.autocast_dtype = device, autocast_dtype

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
               if self.autocast_dtype else contextlib.nullcontext())
        with ctx:
            logits = self.fn(x)  # (B, T, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed(self, x, y, steps: int) -> float:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            self.step(x, y)
        sync()
        return (time.perf_counter() - t) / steps


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    compile_ = args.compile if args.compile is not None else device.type == "cuda"
    dtype = {"float32": None, "bfloat16": torch.bfloat16}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    cfg = GPTConfig(block_size=args.seq_len, n_layer=args.n_layer, n_head=args.n_head,
                    n_embd=args.n_embd)
    torch.manual_seed(0)
    hand = GPT(cfg)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1))
    t = time.perf_counter()
    # captured on the device: the graph keeps the device its position ids were made on
    level = capture(copy.deepcopy(hand).to(device), (ids[:2, :-1].to(device),))
    if args.level == 1:
        import vcyclefx as vf

        level, _ = vf.coalesce(level, width=args.width, depth=args.depth)
        hand = GPT(GPTConfig(block_size=args.seq_len, n_layer=round(args.n_layer * args.depth),
                             n_head=round(args.n_head * args.width),
                             n_embd=round(args.n_embd * args.width)))
        shapes = {k: tuple(v.shape) for k, v in hand.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in level.state_dict().items()}
        if shapes != got:  # e.g. 2 heads stay 2 heads: the level is no GPTConfig any more
            raise SystemExit(f"the coalesced level has no hand-written GPT equivalent "
                             f"({hand.config} expected); use more heads, e.g. the tiny preset")
        hand.load_state_dict(level.state_dict())  # same weights, same function
    c = hand.config
    print(f"level {args.level} made in {time.perf_counter() - t:.1f}s; {c.n_layer} layers x "
          f"{c.n_embd} ({c.n_head} heads), T={args.seq_len}, B={args.batch}, device {device}, "
          f"autocast {dtype}, compiled {'yes' if compile_ else 'no (CPU: see --help)'}", flush=True)
    x, y = ids[:, :-1].to(device), ids[:, 1:].to(device)
    modes = ["eager"] + (["compiled"] if compile_ else [])
    pairs = [Pair(name, mode, copy.deepcopy(m), device, dtype)
             for mode in modes for name, m in (("hand-written", hand), ("level", level))]
    for p in pairs:
        t = time.perf_counter()
        for _ in range(args.warmup):
            p.step(x, y)
        print(f"warm-up {p.name:12s} {p.mode:8s}: {time.perf_counter() - t:.1f}s", flush=True)
    for r in range(args.repeats):
        for p in pairs[r % len(pairs):] + pairs[:r % len(pairs)]:  # rotate the order
            p.times.append(p.timed(x, y, args.steps))
    rows = []
    for mode in modes:
        h, lv = (next(p for p in pairs if p.mode == mode and p.name == n)
                 for n in ("hand-written", "level"))
        mh, ml = statistics.median(h.times), statistics.median(lv.times)
        rows.append(dict(mode=mode, hand_ms=1e3 * mh, level_ms=1e3 * ml, ratio=ml / mh,
                         hand_spread=_spread(h.times), level_spread=_spread(lv.times)))
    print(_table(rows, args))
    return rows


def _spread(times: list[float]) -> float:
    """(max - min) / median over rounds: how noisy the machine was."""
    return (max(times) - min(times)) / statistics.median(times)


def _table(rows: list[dict], args) -> str:
    lines = [f"training step (fwd+bwd+AdamW), median of {args.repeats} rounds x {args.steps} steps",
             f"{'mode':9s} {'hand-written ms':>16s} {'level ms':>10s} {'level/hand':>11s} "
             f"{'spread hand/level':>18s}  within 5%"]
    for r in rows:
        lines.append(f"{r['mode']:9s} {r['hand_ms']:16.2f} {r['level_ms']:10.2f} {r['ratio']:11.3f} "
                     f"{r['hand_spread']:8.1%}/{r['level_spread']:<8.1%}  "
                     f"{'yes' if r['ratio'] <= 1.05 else 'NO'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

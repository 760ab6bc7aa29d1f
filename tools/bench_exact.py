"""Benchmark: how exact the width and depth passes are on every zoo model (float32, CPU).

Per zoo model, at batch 3 / sequence 24 (the capture used batch 2 / sequence 16):
- the relative output error of ``decoalesce(width=2)`` and of ``decoalesce(width=2, depth=2,
  depth_init="identity")`` against the original module (identity growth is impossible for
  post-norm blocks: "n/a");
- the largest absolute difference of any parameter or buffer after ``coalesce(decoalesce(m))``
  with copies in width and depth (the design says exactly 0).
The table is printed last.

    python tools/bench_exact.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vcyclefx as vf  # noqa: E402
from tests.conftest import other_inputs, output_tensor, rel_error  # noqa: E402
from vcyclefx import zoo  # noqa: E402
from vcyclefx.errors import PlanError  # noqa: E402


def measure(name: str) -> dict:
    model, example = zoo.ZOO[name]()
    model.eval()
    level = vf.capture(model, example, frontend=zoo.FRONTEND.get(name, "export"))
    x = other_inputs(example)
    with torch.no_grad():
        want = output_tensor(model(*x))

    def err(m):
        with torch.no_grad():
            return rel_error(output_tensor(m.eval()(*x)), want)

    wide, _ = vf.decoalesce(level, width=2.0)
    try:
        grown, _ = vf.decoalesce(level, width=2.0, depth=2.0, depth_init="identity")
        grown_err = err(grown)
    except PlanError:
        grown_err = None
    big, mapping = vf.decoalesce(level, width=2.0, depth=2.0, depth_init="copy")
    back, _ = vf.coalesce(big, mapping=mapping)
    a, b = level.state_dict(), back.state_dict()
    diff = max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0
               for k in a)
    return {"width2": err(wide), "grown": grown_err, "roundtrip": diff, "tensors": len(a)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(zoo.ZOO), help="comma-separated zoo names")
    names = [n for n in p.parse_args(argv).models.split(",") if n]
    rows = []
    for name in names:
        r = measure(name)
        rows.append((name, r))
        print(f"{name}: {r}", flush=True)
    print()
    print(f"{'model':9s}  {'width 2 rel err':>15s}  {'width 2 + depth 2 identity':>26s}  "
          f"{'round trip max |diff|':>21s}  {'tensors':>7s}")
    for name, r in rows:
        grown = "n/a (post-norm)" if r["grown"] is None else f"{r['grown']:.2e}"
        print(f"{name:9s}  {r['width2']:15.2e}  {grown:>26s}  {r['roundtrip']:21.1f}  "
              f"{r['tensors']:7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: ONNX export of every zoo model at three levels, checked in onnxruntime.

For each zoo model: level 0 (captured), coalesced (width 0.5, depth 0.5) and de-coalesced (width 2,
depth 2, identity blocks; copies for post-norm models, where identity blocks are impossible).
Each level goes through ``vf.export_onnx(..., check=False)`` and then ``check_onnx`` at two input
sizes different from the capture's; the table (printed last) gives the largest relative error of
any output at either size, the export time and the file size.

    python tools/bench_onnx.py                      # every zoo model
    python tools/bench_onnx.py --models gpt2,llama
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vcyclefx as vf  # noqa: E402
from vcyclefx import zoo  # noqa: E402
from vcyclefx.errors import PlanError  # noqa: E402
from vcyclefx.export.onnx import check_onnx  # noqa: E402

KINDS = ("level0", "coalesced", "decoalesced")


def levels_of(name: str) -> dict:
    model, example = zoo.ZOO[name]()
    model.eval()
    level0 = vf.capture(model, example, frontend=zoo.FRONTEND.get(name, "export"))
    small, _ = vf.coalesce(level0, width=0.5, depth=0.5)
    try:
        big, _ = vf.decoalesce(level0, width=2.0, depth=2.0, depth_init="identity")
    except PlanError:  # post-norm: zeroing residual branches is not the identity
        big, _ = vf.decoalesce(level0, width=2.0, depth=2.0, depth_init="copy")
    return {"level0": level0, "coalesced": small, "decoalesced": big}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(zoo.ZOO), help="comma-separated zoo names")
    a = p.parse_args(argv)
    names = [n for n in a.models.split(",") if n]
    unknown = [n for n in names if n not in zoo.ZOO]
    if unknown:
        p.error(f"unknown zoo models {unknown}; choose from {', '.join(zoo.ZOO)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for kind, level in levels_of(name).items():
                path = Path(tmp) / f"{name}-{kind}.onnx"
                t0 = time.perf_counter()
                vf.export_onnx(level, None, path, check=False)
                seconds = time.perf_counter() - t0
                checks = check_onnx(level, path)
                worst = max(c.rel_error for c in checks)
                rows.append((name, kind, worst, all(c.ok for c in checks), seconds,
                             path.stat().st_size / 2**20))
                print(f"{name:9s} {kind:12s} rel err {worst:.2e}  export {seconds:.1f}s", flush=True)
    print()
    print(f"{'model':9s}  {'level':12s}  {'max rel err':>11s}  {'ok':>3s}  {'export s':>8s}  "
          f"{'MiB':>6s}")
    for name, kind, err, ok, seconds, mib in rows:
        print(f"{name:9s}  {kind:12s}  {err:11.2e}  {'yes' if ok else 'NO':>3s}  {seconds:8.1f}  "
              f"{mib:6.2f}")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: wall time of ``vcyclefx inspect MODEL`` as a user runs it (a fresh process:
interpreter start, imports, building the model, capture, analysis, report), several runs,
median; side by side (alternating) with ``--frontend export``, which skips the probe capture and
exports once with symbolic batch/sequence sizes (the way inspect worked before the probe).
Also the in-process split of the default path for the first model.

    python tools/bench_inspect.py --repeats 5 vcyclefx.zoo:gpt2_base
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def split(spec: str) -> list[tuple[str, float]]:
    import gc

    gc.disable()  # as the command does
    t0 = time.perf_counter()
    import vcyclefx as vf
    from vcyclefx.analysis.analyze import analyze
    from vcyclefx.capture.specs import model_from_spec
    from vcyclefx.capture.probe import probe_capture

    t1 = time.perf_counter()
    found = model_from_spec(spec)
    model, example = found.model, found.example
    t2 = time.perf_counter()
    level = probe_capture(model, example, parallel=True)
    name = "capture (probe: 2 static exports, forked)"
    if level is None:
        level, name = vf.capture(model, example), "capture (symbolic torch.export)"
    t3 = time.perf_counter()
    a = analyze(level)
    t4 = time.perf_counter()
    from vcyclefx.analysis.report import Report

    str(Report(a))
    t5 = time.perf_counter()
    return [("import vcyclefx (and torch)", t1 - t0), ("build the model (imports its library)", t2 - t1),
            (name, t3 - t2), ("analysis + chains", t4 - t3), ("report", t5 - t4)]


def _run(spec: str, extra: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vcyclefx.cli", "inspect", spec, *extra], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["vcyclefx.zoo:gpt2_base"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--split", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.split:
        for name, s in split(args.models[0]):
            print(f"{name}\t{s:.3f}")
        return
    rows = []
    for spec in args.models:
        default, symbolic = [], []
        for _ in range(args.repeats):  # alternate, so that both see the same machine
            default.append(_run(spec, []))
            symbolic.append(_run(spec, ["--frontend", "export"]))
        rows.append((spec, default, symbolic))
    out = subprocess.run([sys.executable, __file__, "--split", args.models[0]], check=True,
                         capture_output=True, text=True).stdout
    print(f"\nin-process split of the default path for {args.models[0]} (one run):")
    for line in out.strip().splitlines():
        name, s = line.split("\t")
        print(f"  {name:<44} {float(s):7.2f} s")
    print(f"\n{'vcyclefx inspect MODEL':<24} {'path':<24} {'median':>8} {'min':>8} {'max':>8}"
          f"   ({args.repeats} runs each, alternating)")
    for spec, default, symbolic in rows:
        for path, t in (("default (probe)", default), ("--frontend export", symbolic)):
            print(f"{spec:<24} {path:<24} {statistics.median(t):>7.2f}s {min(t):>7.2f}s {max(t):>7.2f}s")
        print(f"{spec:<24} {'ratio of medians':<24} {statistics.median(default) / statistics.median(symbolic):>8.3f}")


if __name__ == "__main__":
    main()

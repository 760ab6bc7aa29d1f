"""Benchmark: wall time of ``vcyclefx inspect MODEL`` as a user runs it (a fresh process:
interpreter start, imports, building the model, capture, analysis, report), several runs,
median. Also the in-process split of the same work for the first model.

    python tools/bench_inspect.py --repeats 5 tools.zoo:gpt2_base
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def split(spec: str) -> list[tuple[str, float]]:
    t0 = time.perf_counter()
    import vcyclefx as vf
    from vcyclefx.analysis import analyze
    from vcyclefx.leveldir import load_model_spec

    t1 = time.perf_counter()
    model, example = load_model_spec(spec)
    t2 = time.perf_counter()
    level = vf.capture(model, example)
    t3 = time.perf_counter()
    a = analyze(level)
    t4 = time.perf_counter()
    from vcyclefx.report import Report

    str(Report(a))
    t5 = time.perf_counter()
    return [("import vcyclefx (and torch)", t1 - t0), ("build the model (imports its library)", t2 - t1),
            ("capture (torch.export)", t3 - t2), ("analysis + chains", t4 - t3), ("report", t5 - t4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["tools.zoo:gpt2_base"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--split", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.split:
        for name, s in split(args.models[0]):
            print(f"{name}\t{s:.3f}")
        return
    rows = []
    for spec in args.models:
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "vcyclefx.cli", "inspect", spec], check=True,
                           stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - t)
        rows.append((spec, statistics.median(times), min(times), max(times)))
    out = subprocess.run([sys.executable, __file__, "--split", args.models[0]], check=True,
                         capture_output=True, text=True).stdout
    print(f"\nin-process split for {args.models[0]} (one run):")
    for line in out.strip().splitlines():
        name, s = line.split("\t")
        print(f"  {name:<40} {float(s):7.2f} s")
    print(f"\n{'vcyclefx inspect MODEL':<28} {'median':>8} {'min':>8} {'max':>8}   ({args.repeats} runs)")
    for spec, med, lo, hi in rows:
        print(f"{spec:<28} {med:>7.2f}s {lo:>7.2f}s {hi:>7.2f}s")


if __name__ == "__main__":
    main()

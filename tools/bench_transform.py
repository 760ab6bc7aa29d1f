"""Benchmark: capture, analysis and the width pass on GPT-2-base (124M), against a dense-matrix
implementation of the same mapping (the approach of the paper's reference code), side by side.

Each measurement runs in its own subprocess (so peak-memory readings do not mix) and is
repeated; the table reports medians. Peak memory is the resident-set high-water mark during the
measured step minus the resident set just before it (Linux ``/proc/self/clear_refs``).

    python tools/bench_transform.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB; 0 if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _measure(fn):
    import gc

    gc.collect()
    before = _status_kib("VmRSS")
    _reset_peak()
    t = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t
    return result, seconds, max(0, _status_kib("VmHWM") - before) * 1024


def dense_width(analysis, plan):
    """The same coalescing, done the reference-code way: one dense (new x old) matrix per
    resized tensor axis, applied with a matrix product."""
    import torch

    from passes.width import COALESCE
    from vcyclefx.analysis.analyze import PRODUCER
    from vcyclefx.analysis.dims import CAT, PROD, Dim, layout_size

    by_root = {analysis.space(sm.key).root.id: sm for sm in plan.spaces}

    def leaf_matrix(sm, producer):
        m = torch.zeros(sm.small, sm.large)
        m[torch.tensor(sm.index), torch.arange(sm.large)] = 1.0
        if producer:
            m = m / m.sum(dim=1, keepdim=True)
        return m

    def axis_matrix(layout, producer):
        if isinstance(layout, Dim):
            sm = by_root.get(layout.id)
            n = int(layout.size)
            return leaf_matrix(sm, producer) if sm is not None else torch.eye(n)
        kind, kids = layout
        mats = [axis_matrix(k, producer) for k in kids]
        if kind == PROD:
            out = mats[0]
            for m in mats[1:]:
                out = torch.kron(out, m)
            return out
        return torch.block_diag(*mats)

    out = {}
    for name, st in analysis.tensors.items():
        t = analysis.gm.get_parameter(name) if name in dict(analysis.gm.named_parameters(remove_duplicate=False)) else None
        if t is None:
            continue
        w = t.detach()
        changed = False
        for ax, d in enumerate(st.dims):
            layout = analysis.table.layout(d)
            leaves = [x.id for x in analysis.table.leaves(d)]
            if not any(i in by_root for i in leaves):
                continue
            producer = PRODUCER in analysis.roles.get((name, ax), set())
            m = axis_matrix(layout, producer)
            w = torch.tensordot(m, w.movedim(ax, 0), dims=1).movedim(0, ax)
            changed = True
        if changed:
            out[name] = w
    # the tied-tensor compensation the width pass applies (a power-of-two factor folded into a
    # norm), so that both implementations produce the same level
    from passes.units import Units
    from passes.width import _compensations

    units = {rid: Units(sm) for rid, sm in by_root.items()}
    for comp in _compensations(analysis, units):
        for name in comp.fold:
            base = out.get(name, analysis.gm.get_parameter(name).detach())
            out[name] = base * comp.factor
    del COALESCE, CAT, layout_size
    return out


def child(what: str) -> dict:
    import torch

    torch.set_num_threads(2)
    from vcyclefx.zoo import gpt2_base_real

    import vcyclefx as vf
    from passes.width import COALESCE, WidthPlan, width_pass
    from vcyclefx.analysis.analyze import analyze
    from vcyclefx.plan.width import plan_width

    model, example = gpt2_base_real()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    level, capture_s, _ = _measure(lambda: vf.capture(model, example))
    analysis, analysis_s, _ = _measure(lambda: analyze(level, chains=False))
    plan = WidthPlan(COALESCE, tuple(plan_width(analysis, 0.5, coalesce=True).spaces))
    res = {"param_bytes": param_bytes, "capture_s": capture_s, "analysis_s": analysis_s}
    if what == "sparse":
        result, s, peak = _measure(lambda: width_pass(level, analysis, plan))
        res.update(seconds=s, peak_bytes=peak,
                   params_after=sum(p.numel() for p in result.module.parameters()))
    else:
        result, s, peak = _measure(lambda: dense_width(analysis, plan))
        sparse = width_pass(level, analysis, plan).module
        sp = dict(sparse.named_parameters(remove_duplicate=False))
        err = max(float((result[k] - sp[k]).abs().max()) for k in result)
        res.update(seconds=s, peak_bytes=peak, max_abs_diff_vs_sparse=err)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=["sparse", "dense"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    runs: dict[str, list[dict]] = {"sparse": [], "dense": []}
    for r in range(args.repeats):
        for what in ("sparse", "dense"):  # interleaved, so both see the same machine load
            out = subprocess.run([sys.executable, __file__, "--child", what], capture_output=True,
                                 text=True, check=True)
            runs[what].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"run {r + 1}/{args.repeats} {what}: {runs[what][-1]['seconds']:.3f}s", file=sys.stderr)

    def med(what, key):
        return statistics.median(x[key] for x in runs[what])

    pb = runs["sparse"][0]["param_bytes"]
    rows = [
        ("capture (torch.export, dynamic)", f"{med('sparse', 'capture_s'):.2f} s", ""),
        ("analysis (spaces, roles)", f"{med('sparse', 'analysis_s'):.3f} s", ""),
        ("width pass 0.5, sparse index (vcyclefx)", f"{med('sparse', 'seconds'):.3f} s",
         f"{med('sparse', 'peak_bytes') / pb:.2f}x param bytes"),
        ("same mapping, dense matrices", f"{med('dense', 'seconds'):.3f} s",
         f"{med('dense', 'peak_bytes') / pb:.2f}x param bytes"),
        ("speed-up sparse vs dense", f"{med('dense', 'seconds') / med('sparse', 'seconds'):.1f}x", ""),
        ("max |dense - sparse| weight difference", f"{max(x['max_abs_diff_vs_sparse'] for x in runs['dense']):.2e}", ""),
    ]
    print(f"\nGPT-2-base 124M ({pb / 2**20:.0f} MiB of float32 parameters), medians of {args.repeats} runs")
    w = max(len(r[0]) for r in rows)
    print(f"{'step':<{w}}  {'time':>10}  extra peak memory")
    for name, t, mem in rows:
        print(f"{name:<{w}}  {t:>10}  {mem}")


if __name__ == "__main__":
    main()

"""How long does ``vf.to_module`` take, and how many meta-device builds does its search make?

For every model (zoo HF models and timm/torchvision specs), coalesce(0.5, 0.5) and
decoalesce(2, 2), then ``vcyclefx.module.solve`` the level: seconds (median of --repeats),
meta builds, the fields it changed and the verified relative error. Table printed last.

    python tools/bench_to_module.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vcyclefx as vf  # noqa: E402
import vcyclefx.export.module as M  # noqa: E402
from vcyclefx.capture.specs import model_from_spec  # noqa: E402

SPECS = [
    "vcyclefx.zoo:gpt2", "vcyclefx.zoo:llama", "vcyclefx.zoo:bert",
    "timm:deit_tiny_patch16_224?img_size=32&patch_size=8&depth=2&num_classes=10&embed_dim=128"
    "&num_heads=4",
    "timm:convnext_atto?num_classes=10&dims=(16,32,64,128)&depths=(2,2,2,2)",
    "torchvision:vit_b_16?image_size=32&patch_size=8&num_layers=2&num_heads=4&hidden_dim=64"
    "&mlp_dim=128&num_classes=10",
]


def one(spec: str, direction: str, repeats: int) -> dict:
    found = model_from_spec(spec, batch=1)
    fn, kw = ((vf.coalesce, dict(width=0.5, depth=0.5)) if direction == "coalesce"
              else (vf.decoalesce, dict(width=2.0, depth=2.0)))
    level, _ = fn(found.model, found.example, recipe=found.recipe, **kw)
    times, builds = [], 0
    for _ in range(repeats):
        counter = {"n": 0}
        original = M._Builder.shapes

        def counted(self, o, _orig=original):
            if repr(sorted(o.items())) not in self.cache:
                counter["n"] += 1
            return _orig(self, o)

        M._Builder.shapes = counted
        try:
            t = time.perf_counter()
            _, overrides, _, err = M.solve(level)
            times.append(time.perf_counter() - t)
        finally:
            M._Builder.shapes = original
        builds = counter["n"]
    return {"spec": spec.split("?")[0], "direction": direction, "s": statistics.median(times),
            "builds": builds, "changed": overrides, "err": err}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    rows = [one(s, d, a.repeats) for s in SPECS for d in ("coalesce", "decoalesce")]
    print(f"{'model':<28} {'direction':<10} {'solve s':>8} {'builds':>6} {'rel err':>8}  changed")
    for r in rows:
        changed = ", ".join(f"{k}={v}" for k, v in r["changed"].items())
        print(f"{r['spec']:<28} {r['direction']:<10} {r['s']:>8.2f} {r['builds']:>6} "
              f"{r['err']:>8.1e}  {changed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

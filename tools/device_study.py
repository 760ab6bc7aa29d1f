"""The regime study on one GPU in about 8 minutes: ``tools/bench_regime.py`` with GPU sizes.

A few-million-parameter GPT (4 blocks x 256 wide, 4 heads: 3.3M parameters) at about 25 tokens
per parameter of its 1x baseline, on ``--data python-site`` (every ``.py`` file of the
interpreter's path, split by file; hundreds of MB where torch is installed, so 25 tokens per
parameter is under one epoch), three runs at a time on the one device: the full model's
baselines (0.67x, 1x, 1.5x), the coarse level's architecture alone (1x, 3x), and the recipes
(driver defaults, short coarse phases early, ``--grow-when slope``); printed as the same table,
both savings (same-size, envelope) with tokens per parameter. The study directory caches every
finished run (``<name>.json``), so a run cut off by the device's time limit continues.

    python tools/device_study.py --out runs/device-study            # on the GPU machine
    python tools/device_study.py --toy --out /tmp/toy -- --data DIR  # CPU, toy sizes (a test)

Options after ``--`` go to every training run; any ``tools/bench_regime.py`` option may be given
before it to override these defaults (e.g. ``--seeds 1337,4242,7`` when there is time).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools import bench_regime  # noqa: E402

# the device: bf16 autocast and torch.compile are the driver's CUDA defaults
GPU = ["--n-layer", "4", "--n-head", "4", "--n-embd", "256", "--seq-len", "256",
       "--batch-size", "64", "--tpp", "25", "--seeds", "1337", "--lrs", "0.003,0.006",
       "--coarse-lrs", "0.006,0.012", "--budgets", "0.67,1,1.5", "--coarse-budgets", "1,3",
       "--recipes", "defaults,f.02/.08/.90,f.05/.20/.75,slope", "--vcycle-eval-every", "100",
       "--jobs", "3", "--threads", "4"]
GPU_RUN = ["--data", "python-site", "--warmup", "200", "--eval-batches", "20"]
# CPU at toy sizes: the same code path, seconds per run
TOY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--seq-len", "16",
       "--batch-size", "4", "--tpp", "1", "--seeds", "1", "--lrs", "0.01",
       "--coarse-lrs", "0.02", "--budgets", "0.25,1", "--coarse-budgets", "1",
       "--recipes", "f.05/.20/.75", "--vcycle-eval-every", "5", "--jobs", "2"]
TOY_RUN = ["--warmup", "2", "--eval-batches", "4", "--device", "cpu"]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    toy = "--toy" in argv
    if toy:
        argv.remove("--toy")
    ours, run = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    if not any(a == "--out" or a.startswith("--out=") for a in ours):
        ours += ["--out", "runs/device-study"]
    preset, preset_run = (TOY, TOY_RUN) if toy else (GPU, GPU_RUN)
    # later options win (argparse): the defaults first, then the caller's
    return bench_regime.main([*preset, *ours, "--", *preset_run, *run])


if __name__ == "__main__":
    sys.exit(main())

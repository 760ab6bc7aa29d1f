"""Train a GPT with the V-cycle and/or the baseline: the same driver as ``vcyclefx train``.

    python tools/train.py --preset tiny --schedule compare
    torchrun --nproc_per_node 8 tools/train.py --preset gpt2 --schedule compare
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vcyclefx.driver.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""Build the offline demo's tiny ChatML model (no downloads, deterministic).

python scripts/build_demo_model.py [DEST]        # default runs/demo-model
"""

import sys

from dpo_xpu.demo import build_demo_model

if __name__ == "__main__":
    print(build_demo_model(sys.argv[1] if len(sys.argv) > 1 else "runs/demo-model"))

"""`raypipe train` from a checkout (the job is raypipe.jobs.train; --help says more).

    python jobs/train.py --config tiny --data out/demo/data --out out/train-tiny
    ray job submit --working-dir . -- python jobs/train.py --config tiny --data out/demo/data --out out/train-tiny
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's raypipe

from raypipe.jobs import script  # noqa: E402

sys.exit(script("train"))

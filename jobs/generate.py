"""`raypipe generate` from a checkout (the job is raypipe.jobs.generate; --help says more).

    python jobs/generate.py --config demo --out out/demo --num-samples 26
    ray job submit --working-dir . -- python jobs/generate.py --config demo --out out/demo --num-samples 26
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's raypipe

from raypipe.jobs import script  # noqa: E402

sys.exit(script("generate"))

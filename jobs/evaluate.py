"""`raypipe evaluate` from a checkout (the job is raypipe.jobs.evaluate; --help says more).

    python jobs/evaluate.py run --config eval-tiny --out out/eval-tiny
    ray job submit --working-dir . -- python jobs/evaluate.py run --config eval-tiny --out out/eval-tiny
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's raypipe

from raypipe.jobs import script  # noqa: E402

sys.exit(script("evaluate"))

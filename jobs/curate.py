"""`raypipe curate` from a checkout (the job is raypipe.jobs.curate; --help says more).

    python jobs/curate.py --abilities color,animal --out my_abilities
    ray job submit --working-dir . -- python jobs/curate.py --abilities color,animal --out my_abilities
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's raypipe

from raypipe.jobs import script  # noqa: E402

sys.exit(script("curate"))

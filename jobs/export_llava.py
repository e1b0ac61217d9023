"""`raypipe export-llava` from a checkout (the job is raypipe.jobs.export_llava; --help says more).

    python jobs/export_llava.py --data out/demo/data --out out/demo-llava
    ray job submit --working-dir . -- python jobs/export_llava.py --data out/demo/data --out out/demo-llava
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's raypipe

from raypipe.jobs import script  # noqa: E402

sys.exit(script("export-llava"))

"""Export a generated dataset to LLaVA's format (llava.json + images/), for LLaVA's trainer.

    python jobs/export_llava.py --data out/demo/data --out out/demo-llava

Then train with LLaVA's own scripts using
    --data_path out/demo-llava/llava.json --image_folder out/demo-llava
(image paths in the JSON are relative to the export folder). --data may be a URI that
pyarrow reads, e.g. s3://bucket/run1/data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypipe.errors import RaypipeError  # noqa: E402
from raypipe.generate.export import export_llava  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, help="the run's data folder (OUT/data) or URI")
    p.add_argument("--out", required=True, help="folder for llava.json and images/")
    args = p.parse_args(argv)
    try:
        report = export_llava(args.data, args.out)
    except RaypipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export a generated dataset to LLaVA's format (llava.json + images/), for LLaVA's trainer.

    raypipe export-llava --data out/demo/data --out out/demo-llava

Then train with LLaVA's own scripts using
    --data_path out/demo-llava/llava.json --image_folder out/demo-llava
(image paths in the JSON are relative to the export folder). --data may be a URI that
pyarrow reads, e.g. s3://bucket/run1/data.
"""

from __future__ import annotations

import argparse
import sys

from raypipe.generate.export import export_llava
from raypipe.jobs import guarded


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, help="the run's data folder (OUT/data) or URI")
    p.add_argument("--out", required=True, help="folder for llava.json and images/")
    args = p.parse_args(argv)
    report = export_llava(args.data, args.out)
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())

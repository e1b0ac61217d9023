"""Generate an image-dialogue dataset (StableLLaVA method) into OUT.

Locally (embedded Ray):
    python jobs/generate.py --config jobs/configs/demo.yaml --out out/demo
    python jobs/generate.py --config jobs/configs/sd15-openai.yaml --out out/sd15 \
        --num-samples 10000 --abilities color,animal render.batch_size=16

On a Ray cluster (OUT must be shared storage, e.g. s3://bucket/run1):
    ray job submit --working-dir . -- \
        python jobs/generate.py --config jobs/configs/sd15-openai.yaml --out s3://bucket/run1

Running the same command again on the same OUT resumes: rows already written are
skipped by id and answered LLM requests come from OUT/cache.
Any config field can be overridden as dotted.path=value (values parsed as YAML).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypipe.config import GenerateConfig, load_config  # noqa: E402
from raypipe.errors import RaypipeError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="preset YAML, e.g. jobs/configs/demo.yaml")
    p.add_argument("--out", required=True, help="output folder or URI (s3://...)")
    p.add_argument("--num-samples", type=int, help="accepted rows wanted")
    p.add_argument("--abilities", help="comma-separated abilities (default: all)")
    p.add_argument("overrides", nargs="*", help="dotted.field=value overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.num_samples is not None:
        overrides.append(f"num_samples={args.num_samples}")
    if args.abilities:
        overrides.append(
            "abilities=[" + ",".join(a.strip() for a in args.abilities.split(",")) + "]"
        )
    try:
        cfg = load_config(GenerateConfig, args.config, overrides)
        from raypipe.generate.pipeline import generate, summary_table

        manifest = generate(cfg, args.out)
    except RaypipeError as e:
        print(f"raypipe: error: {e}", file=sys.stderr)
        return 2
    print(summary_table(manifest))
    print(
        f"wrote {manifest['counts']['accepted']} rows to {args.out}/data (manifest: {args.out}/manifest.json)"
    )
    if manifest["counts"]["accepted"] < cfg.num_samples:
        print(
            f"raypipe: only {manifest['counts']['accepted']} of {cfg.num_samples} rows were accepted after "
            f"{cfg.max_rounds} rounds; see {args.out}/rejects for the reasons (or raise max_rounds).",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

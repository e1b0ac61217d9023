r"""Generate an image-dialogue dataset (StableLLaVA method) into OUT.

Locally (embedded Ray):
    raypipe generate --config demo --out out/demo
    raypipe generate --config sd15-openai --out out/sd15 \
        --num-samples 10000 --dry-run     # the plan and its cost; calls nothing, writes nothing
    raypipe generate --config sd15-openai --out out/sd15 \
        --num-samples 10000 --abilities color,animal render.batch_size=16

On a Ray cluster (OUT must be shared storage, e.g. s3://bucket/run1):
    ray job submit -- raypipe generate --config sd15-openai --out s3://bucket/run1

Running the same command again on the same OUT resumes: rows already written are
skipped by id and answered LLM requests come from OUT/cache. One run holds OUT at a time
(a lease; --take-over-lease takes a killed run's lease once it expired), and OUT keeps
one dataset: a resume with another seed, model, ... is refused unless
--accept-identity-change. Exit status: 0 when every ability has its quota; 75
(EX_TEMPFAIL) when the run stopped cleanly and continues when run again (max_usd
reached, the LLM endpoint down for llm.outage_stop_s, an actor holding the run's
state died, another run holds OUT or took it over); 1 when the run ended short for
another reason (it says why and how to continue); 2 for a user error (bad config,
unreachable endpoint, OUT holds another dataset, ...).
Any config field can be overridden as dotted.path=value (values parsed as YAML).
"""

from __future__ import annotations

import argparse
import logging
import sys

from raypipe.config import load_config
from raypipe.errors import EXIT_RESUMABLE
from raypipe.generate.config import GenerateConfig
from raypipe.generate.outage import LLM_OUTAGE, outage_message
from raypipe.jobs import guarded, start_ray
from raypipe.jobs.help import HelpParser, generate_epilog


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # --help also lists the presets, the abilities and every config field.
    p = HelpParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog_fn=generate_epilog,
    )
    p.add_argument("--config", required=True, help="preset name (listed below) or YAML path")
    p.add_argument("--out", required=True, help="output folder or URI (s3://...)")
    p.add_argument("--num-samples", type=int, help="accepted rows wanted")
    p.add_argument("--abilities", help="comma-separated abilities (default: all)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the rows, LLM requests, tokens, GPU-hours and USD this run would need, "
        "then exit: no LLM call, no Ray, no model, nothing written",
    )
    p.add_argument(
        "--gpu-s-per-image",
        type=float,
        help="with --dry-run: measured GPU-seconds per image (default: a FLOP model)",
    )
    p.add_argument(
        "--gpu-tflops",
        type=float,
        help="with --dry-run: sustained TFLOP/s of the render GPU (default: 40%% of an H100)",
    )
    p.add_argument(
        "--take-over-lease",
        action="store_true",
        help="take over OUT's lease from a run that stopped renewing it (killed); refused "
        "while that lease has not expired (lease_ttl_s)",
    )
    p.add_argument(
        "--accept-identity-change",
        action="store_true",
        help="resume into an OUT made with other identity settings (seed, models, "
        "templates, ...); the manifest's run history records the change",
    )
    p.add_argument("overrides", nargs="*", help="dotted.field=value overrides")
    return p.parse_args(argv)


@guarded
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
    cfg = load_config(GenerateConfig, args.config, overrides)
    if args.dry_run:
        return dry_run(cfg, args)
    from raypipe.generate.manifest import summary_table
    from raypipe.generate.pipeline import generate, local_cpus

    start_ray(cfg.ray_address, local_cpus(cfg), log_to_driver=cfg.log_to_driver)
    manifest = generate(
        cfg,
        args.out,
        take_over_lease=args.take_over_lease,
        accept_identity_change=args.accept_identity_change,
    )
    if manifest.get("note"):
        print(f"raypipe: {manifest['note']}", file=sys.stderr)
    print(summary_table(manifest))
    print(
        f"wrote {manifest['counts']['accepted']} rows to {args.out}/data (manifest: {args.out}/manifest.json)"
    )
    problem = shortfall(cfg, manifest, args.out)
    if problem:
        print(problem, file=sys.stderr)
        from raypipe.generate.planner import ACTOR_LOST

        resumable = ("max_usd", LLM_OUTAGE, ACTOR_LOST)
        return EXIT_RESUMABLE if manifest.get("stopped") in resumable else 1
    return 0


def dry_run(cfg: GenerateConfig, args: argparse.Namespace) -> int:
    """Print the plan and its cost; reads OUT (when it exists) but creates nothing."""
    from collections import Counter

    from raypipe.abilities import load_catalog
    from raypipe.generate.budget import estimate, format_estimate
    from raypipe.generate.store import OutputStore

    catalog = load_catalog(cfg.catalog_dirs or None, names=cfg.abilities)
    store = OutputStore(args.out)
    accepted = Counter(store.read_columns("data", ["ability"]).column("ability").to_pylist())
    saved = [
        name
        for name in catalog
        if (store.read_json(f"keywords/{name}.json") or {}).get("extra")
        == cfg.extra_keywords_per_ability
    ]
    est = estimate(
        cfg,
        catalog,
        dict(accepted),
        banks_saved=saved,
        gpu_tflops=args.gpu_tflops,
        gpu_s_per_image=args.gpu_s_per_image,
    )
    print(f"dry run for {args.out} (nothing was called or written):")
    print(format_estimate(est))
    return 0


def shortfall(cfg: GenerateConfig, manifest: dict, out: str) -> str | None:
    """What to tell the user when the run ended short of its quota (None: it did not)."""
    from raypipe.generate.executions import MAX_TOP_UPS, TOP_UPS
    from raypipe.generate.planner import ACTOR_LOST

    counts = manifest["counts"]
    accepted, wanted = counts["accepted"], cfg.num_samples
    stopped = manifest.get("stopped")
    lines = []
    if stopped == "max_usd":
        lines.append(
            f"raypipe: stopped planning rows once this run's LLM spend reached max_usd="
            f"{cfg.max_usd:g} USD: {accepted} of {wanted} rows accepted. Run the same command "
            "again to continue (each run may spend up to max_usd; answered requests come "
            "from OUT/cache at no cost), or raise max_usd."
        )
    elif stopped == LLM_OUTAGE:
        lines.append(outage_message(manifest, wanted))
    elif stopped == ACTOR_LOST:
        lines.append(
            f"raypipe: the run's {manifest['runs'][-1].get('lost_actor') or 'an'} actor was "
            f"restarted after a crash and lost the rows it held, so the run stopped: "
            f"{accepted} of {wanted} rows accepted. Run the same command again: it makes "
            "the lost rows again (answered requests come from OUT/cache at no cost)."
        )
    elif stopped == "replace_budget":
        lines.append(
            f"raypipe: the replacement budget is used up (replace_budget="
            f"{cfg.replace_budget:g}): {accepted} of {wanted} rows accepted, "
            f"{counts['rejected']} rejected. See why in {out}/rejects (stage and reason per "
            "row; counts by stage:reason above), then raise replace_budget or run the same "
            "command again to continue."
        )
    elif stopped == TOP_UPS:
        lines.append(
            f"raypipe: rows kept being rejected at render or quality after {MAX_TOP_UPS} "
            f"top-up executions: {accepted} of {wanted} rows accepted, {counts['rejected']} "
            f"rejected. See why in {out}/rejects (stage and reason per row; counts by "
            "stage:reason above), then run the same command again to continue."
        )
    elif stopped or accepted < wanted:
        lines.append(
            f"raypipe: only {accepted} of {wanted} rows were accepted"
            + (f" (stopped: {stopped})" if stopped else "")
            + f"; see {out}/rejects for the reasons. Run the same command again to continue."
        )
    missing = counts.get("missing_ids") or []
    if missing or counts.get("balanced") is False:
        n = missing if isinstance(missing, int) else len(missing)
        lines.append(
            f"raypipe: counts do not balance: planned rows in neither {out}/data nor "
            f"{out}/rejects: {n} (ids in the manifest's counts.missing_ids); running the same "
            "command again plans them again."
        )
    return "\n".join(lines) or None


if __name__ == "__main__":
    sys.exit(main())

r"""Tune LLaVA on raypipe Parquet (and LLaVA / StableLLaVA JSON) with Ray Train + FSDP2.

Locally (embedded Ray; the tiny preset runs on CPUs, e.g. on the demo's output):
    raypipe train --config tiny --data out/demo/data --out out/tiny-train

LLaVA-1.5 7B, both stages, on a Ray cluster with 8 GPUs (OUT on shared storage):
    ray job submit -- raypipe train \
        --config llava15-7b-stage1 \
        --data /data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json:/data/LLaVA-Pretrain/images \
        --out /shared/llava15-7b-stage1
    ray job submit -- raypipe train \
        --config llava15-7b-stage2 \
        --data /data/llava_v1_5_mix665k.json:/data/images --data /shared/raypipe-run/data@1.0 \
        --out /shared/llava15-7b-stage2 model.llava=/shared/llava15-7b-stage1/export

``--data`` takes ``PATH[:IMAGE_FOLDER][@WEIGHT]`` and may repeat (WEIGHT sets the mix).
Any config field can be overridden as dotted.path=value (values parsed as YAML), e.g.
``global_batch_size=64 lora.rank=64``. Running the same command again on the same OUT
resumes from the latest complete checkpoint in OUT/<name>, if the plan (data, seed,
shuffle window, weights, global batch, epochs) is the one it was written with; otherwise
it stops and names what changed (``--new-plan`` starts from the checkpoint's weights
instead). The tuned model is written to OUT/export in Hugging Face format.
"""

from __future__ import annotations

import argparse
import json
import sys

from raypipe import presets
from raypipe.jobs import guarded, start_ray
from raypipe.jobs.help import HelpParser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = HelpParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog_fn=lambda: presets.listing("train"),
    )
    p.add_argument("--config", required=True, help="preset name (listed below) or YAML path")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="PATH[:IMAGE_FOLDER][@WEIGHT]",
        help="training data; repeat to mix (default: data.sources of the preset)",
    )
    p.add_argument("--out", required=True, help="output folder (checkpoints, export)")
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="refuse to continue an existing run in OUT instead of resuming it",
    )
    p.add_argument(
        "--new-plan",
        action="store_true",
        help="resume from the latest checkpoint's weights although the plan changed (data, "
        "seed, shuffle window, weights, batch, epochs): the new plan starts from its first "
        "step, and the export's lineage records the change",
    )
    p.add_argument("overrides", nargs="*", help="dotted.field=value overrides")
    return p.parse_args(argv)


def format_summary(result) -> str:
    """The end-of-run report: steps, loss, throughput, dropped samples, where the model is."""
    lines = [
        f"steps:          {result.steps}"
        + (f" (resumed at step {result.resumed_from_step})" if result.resumed_from_step else ""),
        f"loss:           {result.losses[0]:.4f} (first) -> {result.final_loss:.4f} (final)"
        if result.losses
        else "loss:           (no steps run)",
        f"tokens/s:       {result.tokens_per_s:.0f}"
        if result.tokens_per_s
        else "tokens/s:       -",
        f"samples/s:      {result.samples_per_s:.1f}"
        if result.samples_per_s
        else "samples/s:      -",
    ]
    if result.mfu is not None:
        lines.append(f"MFU:            {100 * result.mfu:.1f}%")
    if result.drops:
        lines.append(f"dropped:        {sum(result.drops.values())} samples")
        lines += [f"  {n:>6}  {reason}" for reason, n in result.drops.items()]
    else:
        lines.append("dropped:        0 samples")
    lines.append(f"checkpoint:     {result.checkpoint or '-'}")
    lines.append(f"export:         {result.export_dir or '- (export off)'}")
    return "\n".join(lines)


@guarded
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from raypipe.train.config import load_train_config

    # The preset first: a wrong name or field fails before torch and Ray are imported.
    cfg = load_train_config(args.config, args.overrides)
    from raypipe.train.trainer import main as run
    from raypipe.train.trainer import preflight, setup

    # 1. Check data and model before starting anything heavy (Ray included).
    cfg, sources = preflight(cfg, args.data)
    start_ray()
    plan, dataset = setup(cfg, sources, args.out, resume=not args.no_resume, new_plan=args.new_plan)
    # 2. Train.
    result = run(plan, dataset)
    print(format_summary(result))
    print(json.dumps(result.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

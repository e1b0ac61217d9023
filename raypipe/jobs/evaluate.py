r"""Evaluate models on per-ability benchmarks (StableLLaVA's Figure 6), or re-score answers.

    raypipe evaluate run --config eval-tiny --out out/eval-tiny
    raypipe evaluate build --config eval-tiny-bench --out BENCH \
        --per-ability 4 --train-data out/demo/data
    raypipe evaluate import --images DIR --items items.jsonl --out BENCH
    raypipe evaluate predict --bench BENCH --model base=LLAVA_DIR \
        --model tuned=out/train/export --out PRED
    raypipe evaluate score --predictions PRED/predictions.parquet --out REPORT
    raypipe evaluate score --predictions answers.jsonl --out REPORT --sheet
    raypipe evaluate score --predictions REPORT/predictions.parquet \
        --review REPORT/review.csv --out REPORT2      # with human marks

``run`` does everything an evaluation preset (``raypipe.evaluate.run.EvaluateConfig``)
says, into one folder: training data and a tuned model when the preset has a
``training`` recipe, the synthetic benchmark, imported real-image benchmarks,
predictions of every model on every benchmark, and the report. Running it again
resumes. Overrides apply to the evaluation preset (``per_ability=10``,
``training.train_overrides=[epochs=1]``).

``build`` makes a synthetic benchmark through the generation job (the same prompt,
render and quality stages; a question of each type in ``benchmark_question_mix`` with
its reference response and answer keywords per image), drops items that overlap the
training data given with ``--train-data``, and makes more rows (bounded rounds) so every
ability gets ``--per-ability`` items, or says how many it got.

``import`` turns a folder of real images and a JSONL of ``{"image", "ability",
"question", "question_type", "answer_keywords"}`` lines (optional ``options``, ``match``,
``synonyms``) into a benchmark folder (``BENCH/items/*.parquet``); malformed lines and
unreadable images are reported with their line numbers and written to
``BENCH/rejects``, never fatal.

``predict`` runs each model over each benchmark: local folders (a raypipe export or any
llava-hf checkpoint) as a Ray Data actor pool with batched greedy decoding through the
model's chat template (a GPU per actor when there are GPUs), or an OpenAI-compatible
vision endpoint (images as data URLs, through the LLM client's cache, limits and
retries). It writes ``predictions.parquet`` (model, prediction, latency, tokens) and
``models.json`` (each model's path and lineage).

``score`` reads predictions (``predictions.parquet`` or a JSONL with ``id``, ``ability``,
``question``, ``question_type``, ``answer_keywords``, ``prediction``, and optionally
``model`` and ``benchmark``) and writes ``scores.json`` (accuracy with Wilson 95%
intervals per model, benchmark and ability), ``predictions.parquet`` (each row's
keyword verdict ``correct`` and the ``matched`` keyword), ``report.md`` and
``abilities.png``. ``--sheet`` adds a human-review sheet (``review.html``,
``review.csv``); ``--review`` reads a marked sheet back, and the report shows human
accuracy beside the keyword score.

Exit status: 0 on success, 2 for a user error (missing file, bad arguments).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raypipe import presets
from raypipe.jobs import guarded, start_ray


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="everything an evaluation preset says, into one folder",
        epilog=presets.listing("evaluate"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", required=True, help="evaluation preset name or YAML path")
    run.add_argument("--out", required=True, help="folder for every output (resumable)")
    run.add_argument("overrides", nargs="*", help="dotted.field=value overrides of the preset")
    build = sub.add_parser("build", help="a synthetic benchmark through the generation job")
    build.add_argument(
        "--config",
        required=True,
        help="generation preset (e.g. eval-tiny-bench), or an evaluation preset (its `benchmark`)",
    )
    build.add_argument("--out", required=True, help="benchmark folder (or URI) to write")
    build.add_argument("--per-ability", type=int, default=50, help="items per ability (50)")
    build.add_argument("--abilities", help="comma-separated abilities (default: all)")
    build.add_argument(
        "--train-data",
        action="append",
        default=[],
        help="training data (raypipe OUT or OUT/data) the items must not overlap; repeat",
    )
    build.add_argument("--name", default="synthetic", help="benchmark name (synthetic)")
    build.add_argument("overrides", nargs="*", help="dotted.field=value config overrides")
    imp = sub.add_parser("import", help="real images + JSONL -> a benchmark folder")
    imp.add_argument("--images", required=True, help="folder the JSONL's image paths are in")
    imp.add_argument("--items", required=True, help="JSONL of benchmark items")
    imp.add_argument("--out", required=True, help="benchmark folder (or URI) to write")
    imp.add_argument("--name", default="real", help="benchmark name (default: real)")
    imp.add_argument(
        "--catalog-dir",
        action="append",
        default=[],
        help="extra ability folders (as generation's catalog_dirs): abilities must be known",
    )
    pred = sub.add_parser("predict", help="models over a benchmark -> predictions.parquet")
    pred.add_argument("--bench", required=True, action="append", help="benchmark folder; repeat")
    pred.add_argument(
        "--model",
        required=True,
        action="append",
        metavar="[NAME=]PATH | [NAME=]openai:MODEL@BASE_URL",
        help="a raypipe export or llava-hf folder, or an OpenAI-compatible vision endpoint; "
        "repeat to compare",
    )
    pred.add_argument("--out", required=True, help="folder for predictions.parquet")
    pred.add_argument("--batch-size", type=int, default=8)
    pred.add_argument("--max-new-tokens", type=int, default=32)
    pred.add_argument("--device", default="auto", help="auto, cuda or cpu")
    pred.add_argument("--num-actors", type=int, default=1, help="model actors (GPUs)")
    pred.add_argument("--key-env", default="OPENAI_API_KEY", help="endpoint key variable")
    score = sub.add_parser("score", help="predictions -> scores.json, report.md, charts")
    score.add_argument("--predictions", required=True, help="predictions.parquet or .jsonl")
    score.add_argument("--out", required=True, help="report folder")
    score.add_argument("--review", help="a marked review.csv: adds human accuracy")
    score.add_argument(
        "--sheet", action="store_true", help="also write a human-review sheet (html + csv)"
    )
    score.add_argument(
        "--judge",
        metavar="MODEL@BASE_URL",
        help="also grade each answer 0/1 with this OpenAI-compatible model (an LLM judge); "
        "its answers are cached in OUT/cache",
    )
    score.add_argument(
        "--judge-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the judge's API key (default: OPENAI_API_KEY)",
    )
    return p.parse_args(argv)


def run_build(args) -> int:
    from raypipe.config import load_config
    from raypipe.evaluate.build import build_benchmark
    from raypipe.evaluate.run import benchmark_config, is_evaluation_preset, load_evaluate_config
    from raypipe.generate.config import GenerateConfig

    overrides = list(args.overrides)
    if args.abilities:
        overrides.append(f"abilities=[{args.abilities}]")
    if is_evaluation_preset(args.config):
        preset = load_evaluate_config(args.config)
        folder = presets.resolve(args.config, "evaluate").parent
        cfg = benchmark_config(preset, folder, overrides)
    else:
        cfg = load_config(GenerateConfig, args.config, overrides)
    report = build_benchmark(cfg, args.out, args.per_ability, args.train_data, benchmark=args.name)
    for ability, short in report["short_abilities"].items():
        print(
            f"raypipe: {ability} got {args.per_ability - short} of {args.per_ability} items "
            "(run the same command again to make more)",
            file=sys.stderr,
        )
    print(json.dumps(report))
    return 0


def run_predict(args) -> int:
    from raypipe.evaluate.inference import check_local_model, parse_model
    from raypipe.evaluate.run import PredictSettings, predict_all

    models = [parse_model(m, api_key_env=args.key_env) for m in args.model]
    for m in models:  # a bad folder fails here, before any model loads
        if m.kind == "local":
            check_local_model(m.path)
    settings = PredictSettings(
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        num_actors=args.num_actors,
        key_env=args.key_env,
    )
    start_ray()
    done = predict_all(args.bench, models, Path(args.out), settings)
    print(
        f"{done['predictions']} predictions ({done['failed']} failed): "
        f"{Path(args.out) / 'predictions.parquet'}"
    )
    return 0


def run_import(args) -> int:
    from raypipe.abilities import load_catalog
    from raypipe.evaluate.import_real import import_real

    abilities = load_catalog(args.catalog_dir or None)
    report = import_real(
        args.images, args.items, args.out, benchmark=args.name, abilities=abilities
    )
    for bad in report.bad_lines:
        print(
            f"raypipe: skipped {args.items} line {bad['line']}: {bad['message']}", file=sys.stderr
        )
    print(f"imported {report.imported} items, rejected {report.rejected}: {args.out}")
    print(json.dumps(_jsonable(report)))
    return 0


def run_score(args) -> int:
    from raypipe.evaluate.run import score_all

    result = score_all(
        args.predictions,
        args.out,
        review=args.review,
        sheet=args.sheet,
        judge=args.judge,
        judge_key_env=args.judge_key_env,
    )
    print_scores(result)
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def print_scores(result: dict) -> None:
    for model, entry in result["models"].items():
        for bench, table in entry["benchmarks"].items():
            s = table["overall"]
            print(f"{model} on {bench}: {s['correct']}/{s['n']} = {100 * s['accuracy']:.1f}%")


def run_run(args) -> int:
    from raypipe.evaluate.run import load_evaluate_config, run_evaluation

    cfg = load_evaluate_config(args.config, args.overrides)
    summary = run_evaluation(
        cfg, args.out, preset_dir=presets.resolve(args.config, "evaluate").parent
    )
    for bench, facts in summary["benchmarks"].items():
        for ability, short in facts.get("short_abilities", {}).items():
            print(
                f"raypipe: {bench}: {ability} got {cfg.per_ability - short} of "
                f"{cfg.per_ability} items (run the same command again to make more)",
                file=sys.stderr,
            )
    for model, benches in summary["scores"].items():
        for bench, s in benches.items():
            print(f"{model} on {bench}: {s['correct']}/{s['n']} = {100 * s['accuracy']:.1f}%")
    print(f"report: {summary['report']}")
    print(json.dumps(summary))
    return 0


def _jsonable(obj):
    from dataclasses import asdict, is_dataclass

    return asdict(obj) if is_dataclass(obj) else obj


@guarded
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "run":
        return run_run(args)
    if args.command == "build":
        return run_build(args)
    if args.command == "import":
        return run_import(args)
    if args.command == "predict":
        return run_predict(args)
    return run_score(args)


if __name__ == "__main__":
    sys.exit(main())

"""Run every benchmark, print one table, write the figures as JSON.

    python benchmarks/run_all.py --quick          # CPU, each benchmark's smoke size: minutes
    python benchmarks/run_all.py                  # CPU, each benchmark's default size
    python benchmarks/run_all.py --gpu            # one CUDA GPU, no internet (see below)
    python benchmarks/run_all.py --only render,train_step --out figures.json

Each benchmark runs as its own process (``python benchmarks/NAME.py ARGS``) and prints one
JSON object as its last line; they are collected into ``--out`` (default
``benchmarks/results/run_all-<UTC time>.json``) with the machine, the command lines and
each run's wall time, and printed as one table: the benchmark, its headline figure, the
ratio of the raypipe path to the bare loop (same run) and that ratio's target. A failed
benchmark is a row with its exit code and output tail; the exit status is then 1.

``--gpu`` (one CUDA GPU, random weights from configs, nothing downloaded) checks that Ray
starts, then runs real-size SD 1.5 at 512 px through the render stage beside the bare
diffusers loop (batch 8 and 16, 20 steps; and one step, no guidance, as SD-Turbo) and a
LLaVA-7B-shaped training step, each with images/s or tokens/s and MFU (FLOPs: common_sd.py,
raypipe/train/flops.py): about 8 minutes on an H100.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent

#: name -> (script, quick args, default args, headline key, ratio key, ratio target)
CPU_RUNS = {
    "render": ("render.py", ["--smoke-test"], [], "pipeline_ips", "ratio", 0.9),
    "stream": ("stream.py", ["--smoke-test"], [], "driver_bytes_per_row", None, None),
    "inference": ("inference.py", ["--smoke-test"], [], "pipeline_items_per_s", "ratio", 0.9),
    "train_step": ("train_step.py", ["--smoke-test"], [], "ray_tokens_per_s", "ratio", 0.9),
    "train_data": ("train_data.py", ["--smoke-test"], [], "max_worker_share", None, None),
    "llm_client": ("llm_client.py", ["--smoke-test"], [], "achieved_rps", "efficiency", 0.85),
    "llm_vllm": ("llm_vllm.py", ["--smoke-test"], [], "pipeline_tokens_per_s", "ratio", 0.9),
}

SD15 = ["--real-size-sd15", "--images", "64", "--steps", "20", "--guidance", "7.5"]
SD15_1STEP = "--real-size-sd15 --images 128 --steps 1 --guidance 0 --batch-size 16".split()
GPU_RUNS = {
    "render_sd15_b8": ("render.py", SD15 + ["--batch-size", "8"], "images_per_s", "ratio", 0.95),
    "render_sd15_b16": ("render.py", SD15 + ["--batch-size", "16"], "images_per_s", "ratio", 0.95),
    "render_sd15_1step": ("render.py", SD15_1STEP, "images_per_s", "ratio", 0.95),
    "train_step_llava7b": (
        "train_step.py",
        ["--gpu-real-size"],
        "bare_tokens_per_s",
        "ratio",
        0.95,
    ),
}

RAY_CHECK = (
    "import ray; ray.init(include_dashboard=False); "
    "print(ray.get(ray.remote(lambda: 'ok').remote())); ray.shutdown()"
)


def run_one(name: str, script: str, args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(HERE / script), *args]
    t0 = time.time()
    rc, out, err, figures = common.run_json(cmd, timeout=timeout)
    wall = round(time.time() - t0, 1)
    entry = {"name": name, "command": " ".join(cmd[1:]), "rc": rc, "wall_s": wall}
    if rc == 0 and figures is not None:
        entry["figures"] = figures
    else:
        entry["rc"] = rc or 1
        entry["tail"] = (out + err)[-2000:]
    return entry


def table(entries: list[dict], specs: dict, judge: bool = True) -> str:
    """The figures as text; with ``judge``, ratios are compared with their targets (not at
    --quick's smoke sizes, where a few items cannot measure a steady state)."""
    rows = [("benchmark", "figure", "value", "ratio", "target", "wall s", "status")]
    for e in entries:
        spec = specs[e["name"]]
        key, ratio_key, target = spec[-3], spec[-2], spec[-1]
        f = e.get("figures") or {}
        value = f.get(key)
        ratio = f.get(ratio_key) if ratio_key else None
        ok = "ok" if e["rc"] == 0 else f"failed ({e['rc']})"
        if e.get("skipped"):
            ok = f"skipped ({e['skipped']})"
        elif judge and ratio is not None and target is not None and e["rc"] == 0:
            ok = "ok" if ratio >= target else "below target"
        rows.append(
            (
                e["name"],
                key,
                f"{value:.4g}" if isinstance(value, (int, float)) else "-",
                f"{ratio:.3f}" if isinstance(ratio, (int, float)) else "-",
                f">= {target}" if target else "-",
                f"{e['wall_s']:.0f}",
                ok,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="each benchmark's smoke size (CPU)")
    ap.add_argument("--gpu", action="store_true", help="the real-size set on one CUDA GPU")
    ap.add_argument("--only", help="comma-separated benchmark names")
    ap.add_argument("--out", help="JSON file to write (default benchmarks/results/...)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark")
    args = ap.parse_args(argv)
    specs = GPU_RUNS if args.gpu else CPU_RUNS
    names = list(specs)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in specs]
        if unknown:
            ap.error(f"unknown benchmark(s) {unknown}; known: {', '.join(specs)}")
    entries = []
    if args.gpu:
        check = subprocess.run(
            [sys.executable, "-c", RAY_CHECK], capture_output=True, text=True, timeout=180
        )
        if check.returncode != 0 or "ok" not in check.stdout:
            print("raypipe: Ray does not start on this machine:\n" + check.stderr[-2000:])
            return 1
    for name in names:
        spec = specs[name]
        script = spec[0]
        extra = spec[1] if args.gpu or args.quick else spec[2]
        if name == "llm_vllm" and not _has_vllm():
            entries.append(
                {"name": name, "command": script, "rc": 0, "wall_s": 0.0, "skipped": "no vllm"}
            )
            continue
        print(f"running {name} ...", flush=True)
        entries.append(run_one(name, script, extra, args.timeout))
    text = table(entries, specs, judge=not args.quick)
    print(text)
    if args.quick:
        print("(--quick: smoke sizes show that every benchmark runs; its ratios are not")
        print(" steady-state figures and are not compared with the targets)")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else HERE / "results" / f"run_all-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": stamp,
        "mode": "gpu" if args.gpu else "quick" if args.quick else "default",
        "machine": machine(),
        "runs": entries,
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"figures: {out}")
    return 1 if any(e["rc"] for e in entries) else 0


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of raypipe's Ray Data LLM stage and engines against a bare ``vllm.LLM.chat``.

    .venv-vllm/bin/python benchmarks/llm_vllm.py                # 128 requests, demo-vllm engine
    .venv-vllm/bin/python benchmarks/llm_vllm.py --smoke-test   # 16 requests

Both sides get the same chat requests (the writers' prompt and dialogue templates for all
13 abilities, structured output on, a seed each) and engine settings (``engine_kwargs`` of
the preset's ``llm``):

- pipeline: raypipe's request rows (chat-template token ids, sampling parameters) through
  ``build_engine_processor`` in one Ray Data execution to the run's engines (a Serve
  application); its window runs from the first request reaching the engines (a row's
  output time minus its engine time) to the last row reaching this process;
- bare: one ``vllm.LLM`` here, its window one ``llm.chat`` call (``bare_tokens_per_s``);
  then the same requests as token ids via ``llm.generate`` (``bare_token_ids_tokens_per_s``).

Engine start-up is left out (``*_engine_start_s``); ``pipeline_first_request_s`` runs from
the execution's start to the first request. Tokens/s counts generated tokens; ratio =
pipeline / bare (target >= 0.9). Runs in .venv-vllm (scripts/bootstrap-vllm.sh); the last
line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import common

PRESET = common.ROOT / "raypipe" / "configs" / "generate" / "demo-vllm.yaml"


def make_requests(n: int):
    from raypipe.abilities import load_catalog
    from raypipe.generate.keywords import keyword_for, seed_bank
    from raypipe.generate.llm_stage import stable_seed
    from raypipe.llm import tasks

    catalog = list(load_catalog().items())
    out, i = [], 0
    while len(out) < n:
        name, ability = catalog[i % len(catalog)]
        c = i // len(catalog)
        bank = seed_bank(ability)
        kws = [keyword_for(bank, 0, name, c * 5 + p) for p in range(5)]
        if i % 2 == 0:
            key = f"prompts/{name}/{c:06d}"
            req = tasks.prompt_request(ability, kws, key=key, seed=stable_seed(0, key))
        else:
            prompt = f"(({kws[0]})), {name} photo, soft light, detailed, high quality"
            q = ability.questions[c % len(ability.questions)]
            req = tasks.dialogue_request(ability, prompt, q, key=f"d/{i}", seed=stable_seed(0, i))
        out.append(tasks.with_schema(req))
        i += 1
    return out


def run_pipeline(cfg, requests) -> dict:
    import ray
    from transformers import AutoTokenizer

    from raypipe.llm.vllm import (
        EngineService,
        build_engine_processor,
        chat_ids,
        model_path,
        sampling_params,
    )

    tok = AutoTokenizer.from_pretrained(model_path(cfg))
    rows = [
        {"rp_payload": str(i), "method": "generate",
         "request_kwargs": {"prompt_token_ids": chat_ids(tok, r.messages),
                            "sampling_params": sampling_params(r)}}
        for i, r in enumerate(requests)
    ]  # fmt: skip
    service = EngineService(cfg.model_dump())
    t = time.time()
    app = service.ensure()
    engine_start_s = time.time() - t
    ds = build_engine_processor(cfg, app)(ray.data.from_items(rows, override_num_blocks=8))
    start = time.time()
    arrivals, outs = [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        now = time.time()
        for r in batch.to_pylist():
            arrivals.append((now, r["rp_engine_s"]))
            outs.append(r)
    first_in = min(t - e for t, e in arrivals)
    window = max(t for t, _ in arrivals) - first_in
    service.stop()
    return {
        "wall_s": time.time() - start,
        "window_s": window,
        "engine_start_s": engine_start_s,
        "first_request_s": first_in - start,
        "completion_tokens": sum(len(r["rp_tokens"]) for r in outs),
        "prompt_tokens": sum(r["rp_prompt_tokens"] for r in outs),
        "errors": sum(1 for r in outs if r.get("__inference_error__")),
    }


def run_bare(cfg, requests) -> dict:
    import vllm
    from vllm.sampling_params import StructuredOutputsParams

    from raypipe.llm.vllm import chat_ids, engine_kwargs, model_path, sampling_params

    kwargs = engine_kwargs(cfg)
    kwargs.pop("disable_log_stats", None)
    t = time.time()
    llm = vllm.LLM(model=model_path(cfg), **kwargs)
    start_s = time.time() - t
    params = []
    for r in requests:
        p = sampling_params(r)
        so = p.pop("structured_outputs")
        params.append(vllm.SamplingParams(**p, structured_outputs=StructuredOutputsParams(**so)))
    t = time.time()
    outs = llm.chat([list(r.messages) for r in requests], params, use_tqdm=False)
    window = time.time() - t
    # The same requests again as token ids made outside the window (as the pipeline's
    # request stage makes them), on the now warm engine: where the time of chat goes.
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": chat_ids(tok, r.messages)} for r in requests]
    t = time.time()
    again = llm.generate(prompts, params, use_tqdm=False)
    ids_window = time.time() - t
    return {
        "ids_window_s": ids_window,
        "ids_completion_tokens": sum(len(o.outputs[0].token_ids) for o in again),
        "window_s": window,
        "engine_start_s": start_s,
        "completion_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--config", default=str(PRESET), help="preset whose llm section is used")
    ap.add_argument("--smoke-test", action="store_true", help="16 requests")
    ap.add_argument("--bare-first", action="store_true", help="run the bare engine first")
    args = ap.parse_args()
    n = 16 if args.smoke_test else args.requests
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAYPIPE_TINY_DIR", str(Path(tempfile.gettempdir()) / "raypipe-tiny"))

    from raypipe.config import load_config
    from raypipe.generate.config import GenerateConfig

    cfg = load_config(GenerateConfig, args.config).llm
    requests = make_requests(n)
    if args.bare_first:
        bare = run_bare(cfg, requests)
    with common.ray_up(True, 2):
        pipe = run_pipeline(cfg, requests)
    # Ray is down, its engine gone: the bare engine gets the machine to itself.
    if not args.bare_first:
        bare = run_bare(cfg, requests)
    p_tps = pipe["completion_tokens"] / pipe["window_s"]
    b_tps = bare["completion_tokens"] / bare["window_s"]
    ids_tps = bare["ids_completion_tokens"] / bare["ids_window_s"]
    for name, figures in (("pipeline", pipe), ("bare", bare)):
        print(name, json.dumps({k: round(v, 3) for k, v in figures.items()}))
    import vllm

    common.emit(
        {
            "pipeline_tokens_per_s": round(p_tps, 1),
            "bare_tokens_per_s": round(b_tps, 1),
            "bare_token_ids_tokens_per_s": round(ids_tps, 1),
            "ratio": round(p_tps / b_tps, 3),
            "requests": n,
            "pipeline_completion_tokens": pipe["completion_tokens"],
            "bare_completion_tokens": bare["completion_tokens"],
            "pipeline_window_s": round(pipe["window_s"], 2),
            "bare_window_s": round(bare["window_s"], 2),
            "pipeline_engine_start_s": round(pipe["engine_start_s"], 1),
            "bare_engine_start_s": round(bare["engine_start_s"], 1),
            "pipeline_first_request_s": round(pipe["first_request_s"], 1),
            "model": cfg.model,
            "batch_size": cfg.vllm.batch_size,
            "structured_output": True,
            "order": "bare first" if args.bare_first else "pipeline first",
            "vllm": vllm.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        }
    )


if __name__ == "__main__":
    main()

"""The dry-run estimate (raypipe.generate.budget) and `jobs/generate.py --dry-run`.

No Ray, no models, no network: the job runs in a subprocess that may not open a socket.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raypipe.abilities import load_catalog
from raypipe.generate.budget import (
    DEFAULT_SUSTAINED_TFLOPS,
    UNET_TFLOP_512,
    VAE_TFLOP_512,
    count_prompt_tokens,
    estimate,
    format_estimate,
)
from raypipe.generate.config import GenerateConfig
from raypipe.llm.tasks import dialogue_request, keyword_request, prompt_request
from raypipe.llm.transport import estimate_prompt_tokens

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["color", "animal", "abnormal"]


def _cfg(**over) -> GenerateConfig:
    data = {
        "num_samples": 10,
        "abilities": NAMES,
        "prompts_per_request": 5,
        "llm": {"backend": "openai", "model": "gpt-4o-mini"},
        "render": {"steps": 30, "guidance_scale": 7.5, "width": 512, "height": 512},
    }
    for key, value in over.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return GenerateConfig.model_validate(data)


@pytest.fixture(scope="module")
def catalog():
    return load_catalog(names=NAMES)


def test_rows_per_ability_quota_minus_accepted(catalog):
    est = estimate(_cfg(), catalog, {"color": 4, "animal": 1, "unknown": 7})
    # 10 over 3 abilities: 4, 3, 3 (the first ability takes the remainder).
    assert {n: a["quota"] for n, a in est["abilities"].items()} == {
        "color": 4,
        "animal": 3,
        "abnormal": 3,
    }
    assert {n: a["to_make"] for n, a in est["abilities"].items()} == {
        "color": 0,
        "animal": 2,
        "abnormal": 3,
    }
    # Replacements: replace_budget x missing, at least k; none for a full ability.
    assert {n: a["replace"] for n, a in est["abilities"].items()} == {
        "color": 0,
        "animal": 5,
        "abnormal": 5,
    }
    assert est["rows"] == {
        "quota": 10,
        "accepted": 5,
        "to_make": 5,
        "replace": 10,
        "worst_case": 15,
    }


def test_replace_budget_scales_worst_case(catalog):
    cfg = _cfg(num_samples=300, replace_budget=0.5)
    est = estimate(cfg, catalog)
    assert [a["replace"] for a in est["abilities"].values()] == [50, 50, 50]
    assert est["requests"]["dialogue"] == {"planned": 300, "worst_case": 450}
    assert est["requests"]["prompts"] == {"planned": 60, "worst_case": 90}
    assert est["gpu"]["hours"]["worst_case"] == pytest.approx(1.5 * est["gpu"]["hours"]["planned"])


def test_requests_by_task(catalog):
    cfg = _cfg(num_samples=31, prompts_per_request=4, extra_keywords_per_ability=120)
    est = estimate(cfg, catalog, banks_saved=["animal"])
    req = est["requests"]
    # quotas 11, 10, 10 -> prompt requests ceil(n / 4) = 3 + 3 + 3
    assert req["prompts"]["planned"] == 9
    assert req["dialogue"]["planned"] == 31
    # 120 extra keywords = 3 requests of 50 per bank; animal's bank is saved already.
    # Worst case: the three unproductive asks that end a bank's growth.
    assert req["keywords"] == {"planned": 6, "worst_case": 12}
    assert req["total"]["planned"] == 6 + 9 + 31
    no_extra = estimate(_cfg(), catalog)
    assert no_extra["requests"]["keywords"] == {"planned": 0, "worst_case": 0}


def test_prompt_tokens_bound_real_requests(catalog):
    """Every request the pipeline can render costs no more than the estimate says."""
    cfg = _cfg(prompts_per_request=6, extra_keywords_per_ability=30)
    per = estimate(cfg, catalog)["tokens_per_request"]
    for ability in catalog.values():
        kws = list(ability.keywords)
        for i in range(0, len(kws), 6):
            req = prompt_request(ability, (kws[i:] + kws)[:6], "k")
            assert count_prompt_tokens(req.messages) <= per["prompts"]["prompt"]
            assert req.max_tokens <= per["prompts"]["completion"]
        for question, example in itertools.product(ability.questions, ability.icl_examples):
            req = dialogue_request(ability, example, question, "k")
            assert count_prompt_tokens(req.messages) <= per["dialogue"]["prompt"]
            assert req.max_tokens <= per["dialogue"]["completion"]
        req = keyword_request(ability, 30, kws, "k")
        assert count_prompt_tokens(req.messages) <= per["keywords"]["prompt"]
        assert req.max_tokens <= per["keywords"]["completion"]


def test_token_counter_errs_high():
    messages = [{"role": "user", "content": "((crimson)) vintage car, city street, 8k\n" * 20}]
    assert count_prompt_tokens(messages) >= estimate_prompt_tokens(messages)
    # Non-ASCII text costs at least one token per 4 bytes.
    assert count_prompt_tokens([{"content": "深红色的老式汽车" * 10}]) >= 3 + 4 + 240 // 4


def test_tokens_and_usd(catalog):
    est = estimate(_cfg(num_samples=30), catalog)
    tok, per = est["tokens"], est["tokens_per_request"]
    assert tok["completion"]["planned"] == (
        est["requests"]["prompts"]["planned"] * per["prompts"]["completion"]
        + est["requests"]["dialogue"]["planned"] * per["dialogue"]["completion"]
    )
    assert per["prompts"]["completion"] == 128 + 96 * 5  # the request's own max_tokens
    p, c = 0.15, 0.60  # gpt-4o-mini in the default llm.prices
    for col in ("planned", "worst_case"):
        want = (tok["prompt"][col] * p + tok["completion"][col] * c) / 1e6
        assert est["llm"]["usd"][col] == pytest.approx(want)
        assert est["usd"][col] == pytest.approx(want)  # no gpu_hour_usd: GPU not counted
    assert est["llm"]["price_usd_per_m"] == [p, c]
    assert any("GPU cost not counted" in n for n in est["notes"])
    # A dated model name is priced by its prefix, as the client prices it.
    dated = estimate(_cfg(num_samples=30, llm={"model": "gpt-4o-mini-2024-07-18"}), catalog)
    assert dated["llm"]["usd"] == est["llm"]["usd"]


@pytest.mark.parametrize(
    "llm,note",
    [
        ({"model": "my-local-model"}, "no price for model 'my-local-model'"),
        ({"backend": "offline"}, "offline"),
    ],
)
def test_unpriced_models_cost_zero_and_say_so(catalog, llm, note):
    est = estimate(_cfg(llm=llm), catalog)
    assert est["llm"]["usd"] == {"planned": 0.0, "worst_case": 0.0}
    assert est["tokens"]["prompt"]["planned"] > 0
    assert any(note in n for n in est["notes"])


def test_gpu_hours(catalog):
    cfg = _cfg(num_samples=3600, gpu_hour_usd=2.0, render={"max_actors": 4})
    gpu = estimate(cfg, catalog)["gpu"]
    tflop = 30 * UNET_TFLOP_512 * 2 + VAE_TFLOP_512  # guidance 7.5: two UNet calls per step
    assert gpu["tflop_per_image"] == pytest.approx(tflop)
    assert gpu["hours"]["planned"] == pytest.approx(3600 * tflop / DEFAULT_SUSTAINED_TFLOPS / 3600)
    assert gpu["wall_hours"]["planned"] == pytest.approx(gpu["hours"]["planned"] / 4)
    assert gpu["usd"]["planned"] == pytest.approx(2.0 * gpu["hours"]["planned"])

    turbo = _cfg(render={"steps": 4, "guidance_scale": 0.0, "width": 1024, "height": 1024})
    gpu = estimate(turbo, catalog)["gpu"]
    assert gpu["tflop_per_image"] == pytest.approx(4 * (4 * UNET_TFLOP_512 + VAE_TFLOP_512))
    assert gpu["usd"] is None

    measured = estimate(_cfg(num_samples=3600), catalog, gpu_s_per_image=0.5)["gpu"]
    assert measured["hours"]["planned"] == pytest.approx(0.5)
    faster = estimate(_cfg(), catalog, gpu_tflops=2 * DEFAULT_SUSTAINED_TFLOPS)["gpu"]
    assert faster["s_per_image"] == pytest.approx(tflop / DEFAULT_SUSTAINED_TFLOPS / 2)


def test_max_usd_warning(catalog):
    est = estimate(_cfg(num_samples=5000, max_usd=0.01), catalog)
    assert any("max_usd=0.01" in n for n in est["notes"])


def test_nothing_to_make(catalog):
    est = estimate(_cfg(), catalog, {"color": 9, "animal": 3, "abnormal": 3})
    assert est["rows"]["to_make"] == 0 and est["rows"]["worst_case"] == 0
    assert est["requests"]["total"] == {"planned": 0, "worst_case": 0}
    assert est["usd"]["worst_case"] == 0


def test_format_estimate(catalog):
    est = estimate(_cfg(num_samples=10000, gpu_hour_usd=3.0), catalog, {"color": 100})
    text = format_estimate(est)
    assert "planned" in text and "worst case" in text
    for name in NAMES:
        assert any(line.startswith(name) for line in text.splitlines())
    assert f"{est['tokens']['prompt']['worst_case']:,}" in text
    assert "GPU-hours" in text and "GPU USD at $3/h" in text and "TFLOP" in text
    assert f"${est['usd']['planned']:,.2f}" in text


# --- jobs/generate.py --dry-run ---------------------------------------------------------

# Runs the job in this interpreter with every socket connection refused, then reports
# which heavy modules it imported.
_RUNNER = """
import json, runpy, socket, sys
def refuse(*a, **k):
    raise AssertionError("the dry run opened a network connection")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
sys.argv = ["jobs/generate.py", *sys.argv[1:]]
code = 0
try:
    runpy.run_path("jobs/generate.py", run_name="__main__")
except SystemExit as e:
    code = e.code
print("MODULES " + json.dumps(sorted(m for m in ("ray", "torch", "diffusers", "transformers") if m in sys.modules)))
sys.exit(code)
"""


def _dry_run(tmp_path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    preset = tmp_path / "preset.yaml"
    preset.write_text(
        "num_samples: 100\n"
        "abilities: [color, animal]\n"
        "extra_keywords_per_ability: 60\n"
        "gpu_hour_usd: 2.5\n"
        "llm: {backend: openai, model: gpt-4o-mini, base_url: 'http://127.0.0.1:9/v1', "
        "api_key_env: RAYPIPE_TEST_NO_SUCH_KEY}\n"
        "render: {model: stable-diffusion-v1-5/stable-diffusion-v1-5, steps: 30, "
        "guidance_scale: 7.5}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAYPIPE_TEST_NO_SUCH_KEY"}
    return subprocess.run(
        [sys.executable, "-c", _RUNNER, "--config", str(preset), "--out", str(out), "--dry-run"]
        + list(overrides),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dry_run_calls_nothing_and_writes_nothing(tmp_path):
    out = tmp_path / "OUT"
    res = _dry_run(tmp_path, out)
    assert res.returncode == 0, res.stderr
    assert "LLM requests" in res.stdout and "GPU-hours" in res.stdout
    assert "color" in res.stdout and "animal" in res.stdout
    assert not out.exists()
    modules = json.loads(res.stdout.split("MODULES ", 1)[1])
    assert modules == []  # no Ray, no model libraries


def test_dry_run_counts_what_out_holds(tmp_path):
    from fixture_data import write_fixture_parquet

    out = tmp_path / "OUT"
    write_fixture_parquet(out / "data", 20)  # 20 accepted "color" rows
    (out / "keywords").mkdir()
    (out / "keywords" / "color.json").write_text(
        json.dumps({"ability": "color", "extra": 60, "keywords": ["red"]})
    )
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    res = _dry_run(tmp_path, out, "num_samples=60")
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("color"))
    assert line.split()[1:4] == ["30", "20", "10"]  # quota, accepted, to make
    # color's bank is saved: only animal asks for keywords (ceil(60 / 50) = 2 requests).
    kw = next(ln for ln in res.stdout.splitlines() if "LLM requests: keywords" in ln)
    assert kw.split()[-2] == "2"
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_dry_run_bad_config_is_a_user_error(tmp_path):
    res = _dry_run(tmp_path, tmp_path / "OUT", "abilities=[no_such_ability]")
    assert res.returncode == 2
    assert "no_such_ability" in res.stderr


# --- jobs/generate.py: how a short run ends ----------------------------------------------


def _job():
    from raypipe.jobs import generate

    return generate


def _run_manifest(accepted: int, stopped, missing=()) -> dict:
    return {
        "stopped": stopped,
        "counts": {
            "accepted": accepted,
            "rejected": 7,
            "balanced": not missing,
            "missing_ids": list(missing),
        },
    }


@pytest.mark.parametrize(
    "accepted,stopped,want",
    [
        (10, None, None),
        (8, "max_usd", ["max_usd=0.5", "same command again"]),
        (8, "replace_budget", ["replace_budget=1", "OUT/rejects", "same command again"]),
        (8, None, ["only 8 of 10", "OUT/rejects", "same command again"]),
        (10, "max_usd", ["max_usd=0.5"]),
    ],
)
def test_job_says_how_to_continue(accepted, stopped, want):
    cfg = _cfg(max_usd=0.5)
    text = _job().shortfall(cfg, _run_manifest(accepted, stopped), "OUT")
    if want is None:
        assert text is None
    else:
        assert all(w in text for w in want), text
        assert "max_rounds" not in text


def test_job_reports_unbalanced_counts():
    text = _job().shortfall(_cfg(), _run_manifest(10, None, ["color-s0-0000003"]), "OUT")
    assert "nor OUT/rejects: 1 " in text and "missing_ids" in text

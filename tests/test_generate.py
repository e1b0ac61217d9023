"""The generation job end to end on CPU: tiny SD, offline writer or the loopback LLM server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from raypipe.config import load_config
from raypipe.errors import CatalogError, ConfigError, EndpointError
from raypipe.generate.config import GenerateConfig
from raypipe.generate.pipeline import generate
from raypipe.schema import SAMPLE_SCHEMA, validate_samples

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "raypipe" / "configs" / "generate" / "demo.yaml"
sys.path.insert(0, str(Path(__file__).parent))
from llm_server import LLMServer  # noqa: E402


def demo_config(*overrides: str) -> GenerateConfig:
    return load_config(GenerateConfig, DEMO, ["log_to_driver=false", *overrides])


def read_data(out: Path):
    return pq.read_table(out / "data").to_pylist() if (out / "data").exists() else []


def read_rejects(out: Path):
    parts = list((out / "rejects").glob("*.parquet"))
    return pq.read_table(out / "rejects").to_pylist() if parts else []


# ---------------------------------------------------------------------------------------
# A realistic answerer for the loopback server: reads the rendered templates.
# ---------------------------------------------------------------------------------------


SUBJECTS = (
    "old bicycle",
    "ceramic vase",
    "wool scarf",
    "city bus",
    "garden chair",
    "kite",
    "teapot",
)
SCENES = ("sunny park", "quiet kitchen", "rainy street", "mountain lake", "busy market")


def template_responder(bad_keywords: frozenset[str] = frozenset()):
    """Answers prompt and dialogue requests the way a well-behaved model would.

    A prompt request whose keywords include one in ``bad_keywords`` gets malformed text.
    """

    def respond(messages):
        user = messages[-1]["content"]
        if "Keywords to use, one per prompt:" in user:
            block = user.split("Keywords to use, one per prompt:")[1].split("\n\n")[0]
            keywords = re.findall(r"^\d+\.\s*(.+)$", block.strip(), flags=re.M)
            if bad_keywords & set(keywords):
                return "Sure! Here are some ideas for images you might like."
            return "\n".join(
                f"{i}. (({kw})) {SUBJECTS[len(kw) % 7]} beside a {kw} {SUBJECTS[(i + len(kw)) % 7]},"
                f" {kw} tones, {SCENES[(len(kw) + i) % 5]}, realistic photo, 8k"
                for i, kw in enumerate(keywords, 1)
            )
        if "Description:" in user:
            prompt = re.search(r"^Question: .+\nPrompt: (.+)$", user, flags=re.M).group(1)
            kw = re.search(r"\(\((.+?)\)\)", prompt).group(1)
            return f"Prompt: {prompt}\nDescription: The image shows {kw} in the centre of the frame. It is lit by soft light."
        return "1. extra keyword"

    return respond


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------


def test_demo_writes_valid_balanced_reproducible_dataset(ray_local, tiny_dir, tmp_path):
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    cfg = demo_config()
    out1, out2 = tmp_path / "a", tmp_path / "b"
    with warnings.catch_warnings():  # the demo uses no deprecated Ray path
        warnings.simplefilter("error", RayDeprecationWarning)
        manifest = generate(cfg, str(out1))
    # Full render batches: 26 rows in calls of 8, only the last one short.
    assert manifest["runs"][-1]["render"]["rows_per_call"] == {"2": 1, "8": 3}

    rows = read_data(out1)
    assert len(rows) == 26
    assert {r["ability"] for r in rows} == set(
        json.loads(json.dumps(manifest["counts"]["abilities"]))
    )
    assert len({r["ability"] for r in rows}) == 13
    table = pq.read_table(out1 / "data")
    assert table.schema.equals(SAMPLE_SCHEMA, check_metadata=False)
    assert validate_samples(table.cast(SAMPLE_SCHEMA)) == []
    for r in rows:
        img = Image.open(__import__("io").BytesIO(r["image"]["bytes"]))
        assert img.size == (r["width"], r["height"]) == (64, 64)
        assert r["conversations"][0]["value"].startswith("<image>\n")
        assert r["prompt"].startswith("((") and r["keywords"]
        assert r["keywords"][0].lower() in r["conversations"][1]["value"].lower()
    assert len({r["id"] for r in rows}) == 26

    counts = manifest["counts"]
    assert counts["balanced"]
    for stage, c in counts["stages"].items():
        assert c["in"] == c["accepted"] + c["rejected"], stage
    assert counts["stages"]["quality"]["accepted"] == 26
    on_disk = json.loads((out1 / "manifest.json").read_text())
    assert on_disk["counts"]["accepted"] == 26 and on_disk["versions"]["ray"]
    assert (out1 / "keywords" / "color.json").exists()

    # `datasets` reads the image column as images.
    import datasets

    ds = datasets.load_dataset(
        "parquet", data_files=str(out1 / "data" / "*.parquet"), split="train"
    )
    assert ds.num_rows == 26
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds[0]["image"].size == (64, 64)

    # Same config again: identical ids, prompts and image bytes.
    generate(cfg, str(out2))
    a = {r["id"]: r for r in rows}
    b = {r["id"]: r for r in read_data(out2)}
    assert a.keys() == b.keys()
    for sid in a:
        assert a[sid]["prompt"] == b[sid]["prompt"]
        assert a[sid]["image"]["bytes"] == b[sid]["image"]["bytes"], sid
        assert a[sid]["conversations"] == b[sid]["conversations"]

    # Re-running on a complete OUT adds nothing and starts nothing: it returns OUT's
    # manifest with a note, and OUT stays as it was.
    before = sorted((p.relative_to(out1), p.stat().st_mtime_ns) for p in out1.rglob("*"))
    again = generate(cfg, str(out1))
    assert "nothing to do" in again["note"] and again["runs"] == on_disk["runs"]
    assert sorted((p.relative_to(out1), p.stat().st_mtime_ns) for p in out1.rglob("*")) == before


def test_black_images_are_rejected_with_reason(ray_local, tiny_dir, tmp_path):
    # A darkness threshold at the top of the 0-255 scale marks every image black; with no
    # replacement budget beyond the minimum (k rows), the run plans 3 + 5 rows and stops.
    cfg = demo_config(
        "abilities=[animal]", "num_samples=3", "replace_budget=0", "quality.max_mean_dark=255"
    )
    manifest = generate(cfg, str(tmp_path))
    assert read_data(tmp_path) == []
    rejects = read_rejects(tmp_path)
    assert len(rejects) == 3 + 5 and {(r["stage"], r["reason"]) for r in rejects} == {
        ("quality", "black_image")
    }
    assert manifest["counts"]["stages"]["quality"] == {"in": 8, "accepted": 0, "rejected": 8}
    assert manifest["stopped"] == "replace_budget" and manifest["counts"]["balanced"]


def test_bad_inputs_fail_before_rendering(tmp_path, monkeypatch):
    from raypipe.generate import pipeline

    started = []  # the run's actors: what a run starts once its inputs are checked
    real_start = pipeline.start_actors
    monkeypatch.setattr(
        pipeline, "start_actors", lambda *a, **k: started.append(a) or real_start(*a, **k)
    )
    with pytest.raises(CatalogError, match="unknown|known"):
        generate(demo_config("abilities=[colour]"), str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(GenerateConfig, REPO / "raypipe" / "configs" / "generate" / "nope.yaml")
    with pytest.raises(ConfigError, match="render.batchsize"):
        demo_config("render.batchsize=3")
    os.environ.pop("RAYPIPE_MISSING_KEY", None)
    with pytest.raises(EndpointError, match="RAYPIPE_MISSING_KEY"):
        generate(
            demo_config("llm.backend=openai", "llm.api_key_env=RAYPIPE_MISSING_KEY"),
            str(tmp_path / "b"),
        )
    os.environ["RAYPIPE_TEST_KEY"] = "sk-test"
    with pytest.raises(EndpointError):
        generate(
            demo_config(
                "llm.backend=openai",
                "llm.api_key_env=RAYPIPE_TEST_KEY",
                "llm.base_url=http://127.0.0.1:9/v1",
                "llm.timeout_s=2",
            ),
            str(tmp_path / "c"),
        )
    from raypipe.errors import ModelError

    with pytest.raises(ModelError):
        generate(demo_config(f"render.model={tmp_path / 'no-such-model'}"), str(tmp_path / "d"))
    assert not started  # each failed before the run started anything
    assert not list((tmp_path).glob("*/data/*.parquet"))


def _job_cmd(out: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "jobs" / "generate.py"),
        "--config",
        str(DEMO),
        "--out",
        str(out),
        *overrides,
    ]


def _job_env(tiny_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAYPIPE_TINY_DIR=str(tiny_dir), RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.integration
@pytest.mark.parametrize("when", ["after_parts", "prompt_phase"])
def test_killed_job_resumes_without_loss_duplicates_or_repaid_requests(
    ray_local, tiny_dir, tmp_path, when
):
    """A real SIGKILL of the job's whole process group: after some rows are written, or
    while the first prompts are being answered (nothing written yet). The re-run is the
    same job's ``main`` in this process, on the session's Ray (no second Ray start)."""
    out = tmp_path / "out"
    n = 20  # 2 abilities x 2 prompt requests of 5; the kill comes after 2 parts of 4 rows
    env = _job_env(tiny_dir)
    env["RAYPIPE_TEST_KEY"] = "sk-test"
    with LLMServer(responder=template_responder(), latency_s=0.4, lifetime_s=600) as server:
        overrides = [
            "--num-samples",
            str(n),
            "--abilities",
            "color,animal",
            "llm.backend=openai",
            f"llm.base_url={server.url}",
            "llm.api_key_env=RAYPIPE_TEST_KEY",
            "llm.model=test-model",
            "llm.concurrency=1",
            "llm_batch_chunks=1",
            "part_max_rows=4",
            "render.batch_size=4",
            "log_to_driver=false",
            # The killed run's lease expires 2 s after its last renewal; the re-run takes
            # it over (as a user does once they know the run is dead).
            "lease_ttl_s=2",
            "lease_renew_s=0.5",
        ]
        # stderr to a file: a pipe nobody reads would block the job once it fills.
        log_path = tmp_path / "killed-job.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed after the kill
        proc = subprocess.Popen(
            _job_cmd(out, *overrides),
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if when == "prompt_phase" and len(server.answered_by_hash) >= 2:
                break
            if len(list((out / "data").glob("part-*.parquet"))) >= 2:
                break
            time.sleep(0.05 if when == "prompt_phase" else 0.2)
        assert proc.poll() is None, (
            "job finished before it could be killed: " + log_path.read_text()[-2000:]
        )
        # Answered but maybe not yet cached by the job: under load, the client can take
        # over a second from the server's answer to its cache write.
        in_flight_at_kill = server.in_flight_now(answered_within_s=2.0)
        killed_at = time.monotonic()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        in_flight_at_kill |= server.in_flight_now(answered_within_s=2.0)
        written = len(read_data(out))
        assert written < n and (written > 0 or when == "prompt_phase"), (
            written,
            log_path.read_text()[-2000:],
        )
        deadline = time.time() + 10  # the server finishes what the dead job had asked
        while server.in_flight_now() and time.time() < deadline:
            time.sleep(0.05)
        answered_before = Counter(server.answered_by_hash)
        # The killed job's Ray workers can outlive its driver for a moment and send a
        # request or two after the kill (seen 1.4 s after it): answered to a dead job too.
        quiet, seen = time.time(), len(server.events)
        while time.time() - quiet < 2.0 and time.time() < deadline + 10:
            if len(server.events) != seen:
                quiet, seen = time.time(), len(server.events)
            time.sleep(0.1)
        resumed_at = time.monotonic()
        in_flight_at_kill |= {e.hash for e in server.events if killed_at <= e.time < resumed_at}

        time.sleep(max(0.0, killed_at + 2.5 - time.monotonic()))  # the lease expires
        from raypipe.jobs import generate as generate_job

        rerun = _job_cmd(out, *overrides, "--take-over-lease")[2:]  # from --config on
        assert generate_job.main(rerun) == 0

    rows = read_data(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == n and len(set(ids)) == n
    rejected = {r["id"] for r in read_rejects(out)}
    assert not rejected & set(ids)
    # No answer the first run received was paid for again; only requests that were in
    # flight at the kill (answered to a dead job, so never cached) may be asked twice.
    repeated = {d for d, n in server.answered_by_hash.items() if n > 1}
    unexpected = {
        d[:12]: [(round(e.time - killed_at, 2), e.attempt) for e in server.events if e.hash == d]
        for d in repeated - in_flight_at_kill
    }  # request -> (seconds from the kill, attempt) of each time it was received
    assert not unexpected, f"a cached answer was requested again: {unexpected}"
    assert max(server.answered_by_hash.values()) <= 2
    assert len(answered_before) >= 2


@pytest.mark.integration
def test_driver_memory_stays_flat_with_10x_rows(tiny_dir, tmp_path):
    """Rows stream through the workers: the driver's peak RSS does not grow with N.

    One job process (its own Ray) runs the job twice into one OUT: 13 rows (one per
    ability), then 130, which makes the 117 rows more. The peak RSS after the first run
    includes the job's start-up (imports, Ray, the first execution); what the second run
    adds to it is what ten times the rows cost the driver.
    """
    probe = (
        "import resource, sys\n"
        "from raypipe.jobs import generate as job\n"
        "for n in (13, 130):\n"
        "    assert job.main([*sys.argv[1:], '--num-samples', str(n)]) == 0, n\n"
        "    print('MAXRSS_KB', n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", probe, *_job_cmd(out, "log_to_driver=false")[2:]]
    res = subprocess.run(cmd, env=_job_env(tiny_dir), capture_output=True, timeout=400)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    peaks = {int(n): int(kb) for n, kb in re.findall(rb"MAXRSS_KB (\d+) (\d+)", res.stdout)}
    assert set(peaks) == {13, 130} and len(read_data(out)) == 130
    growth_mb = (peaks[130] - peaks[13]) / 1024
    print(f"driver peak RSS (KiB) by rows: {peaks}; growth {growth_mb:.1f} MB")
    # 60 MB for 117 more rows: the same ~0.5 MB a row as 120 MB for 26 -> 260 rows.
    assert growth_mb < 60, f"driver peak grew by {growth_mb:.0f} MB for 10x rows: {peaks}"

"""Inference over a benchmark: what a model string names, folders that fail fast, the tiny
LLaVA in-process and on the Ray Data actor pool (greedy, so the same answers every run,
and the answers of a bare ``model.generate``), and a vision endpoint on the loopback
server through the LLM client, whose second run is served from the cache."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from raypipe.errors import ModelError
from raypipe.evaluate.inference import PREDICTION_COLUMNS, check_local_model, parse_model
from raypipe.evaluate.items import items_to_table, read_benchmark, write_benchmark
from raypipe.evaluate.predict_local import LlavaPredictor, predict_local
from raypipe.evaluate.predict_openai import image_data_url, predict_openai
from raypipe.evaluate.report import score_rows, scores
from raypipe.llm.config import LLMConfig
from raypipe.tiny import resolve_tiny

KEY_ENV = "RAYPIPE_TEST_VISION_KEY"
SENTINEL = "sk-raypipe-VISION-SENTINEL-91c3e7"
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220)}
ITEM_FIELDS = ("id", "benchmark", "ability", "question", "question_type", "answer_keywords")


def png(colour: str, width: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, 32), COLOURS[colour]).save(buf, format="PNG")
    return buf.getvalue()


def make_items(n: int = 6) -> pa.Table:
    """``n`` colour items: wh, yes/no and either-or questions of different lengths, and
    images of two widths."""
    names = sorted(COLOURS)
    rows = []
    for i in range(n):
        colour, other = names[i % 3], names[(i + 1) % 3]
        kind = ("wh", "yes_no", "either_or")[i % 3]
        question, keywords = {
            "wh": ("What colour is the square?", [colour]),
            "yes_no": (f"Is the square {other}? Answer yes or no.", ["no"]),
            "either_or": (f"Is the square {colour} or {other}?", [colour]),
        }[kind]
        rows.append(
            {
                "id": f"synthetic-color-{i:03d}",
                "benchmark": "synthetic",
                "ability": "color",
                "image": png(colour, 32 + 8 * (i % 2)),
                "question": question,
                "question_type": kind,
                "answer_keywords": keywords,
                "options": [colour, other] if kind == "either_or" else [],
            }
        )
    return items_to_table(rows)


@pytest.fixture(scope="module")
def tiny_llava(tiny_dir) -> str:
    return resolve_tiny("raypipe-tiny/tiny-llava")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("bench") / "synthetic")
    write_benchmark(out, make_items(6))
    return out


def bare_generate(folder: str, table: pa.Table, batch_size: int, max_new_tokens: int) -> list:
    """The answers of plain transformers calls: left-padded batches, greedy decoding."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    model = LlavaForConditionalGeneration.from_pretrained(folder, use_safetensors=True).eval()
    rows = table.to_pylist()
    answers = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        texts = [
            processor.apply_chat_template(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": r["question"]}],
                    }
                ],
                add_generation_prompt=True,
            )
            for r in batch
        ]
        images = [Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB") for r in batch]
        enc = processor(
            images=images, text=texts, padding=True, return_tensors="pt", add_special_tokens=False
        )
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, enc["input_ids"].shape[1] :]
        answers += [a.strip() for a in processor.batch_decode(new, skip_special_tokens=True)]
    return answers


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("latency_s")} for r in rows]


def check_rows(rows: list[dict], items: pa.Table, model: str) -> None:
    assert [r["id"] for r in rows] == items.column("id").to_pylist()
    for row, item in zip(rows, items.to_pylist()):
        assert "image" not in row
        assert set(PREDICTION_COLUMNS) <= set(row)
        for name in ITEM_FIELDS + ("options", "match", "synonyms"):
            assert row[name] == item[name]
        assert row["model"] == model
        assert isinstance(row["prediction"], str) and row["error"] is None
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
        assert row["latency_s"] >= 0 and row["batch_latency_s"] >= row["latency_s"]


# ---------------------------------------------------------------------------------------
# What to evaluate, and folders that fail fast
# ---------------------------------------------------------------------------------------


def test_model_strings(tiny_llava):
    tiny = parse_model("raypipe-tiny/tiny-llava")
    assert (tiny.kind, tiny.name, tiny.path) == ("local", "tiny-llava", tiny_llava)
    assert tiny.lineage is None  # not a raypipe export
    named = parse_model(f"baseline={tiny_llava}")
    assert (named.name, named.path) == ("baseline", tiny_llava)
    assert parse_model(tiny_llava).name == "tiny-llava-v2"  # the folder's name

    remote = parse_model(
        "tuned=openai:llava-1.5-7b@http://user:pa55word@gpu-box:8000/v1", api_key_env="MY_KEY"
    )
    assert (remote.kind, remote.name, remote.model) == ("openai", "tuned", "llava-1.5-7b")
    assert remote.base_url == "http://user:pa55word@gpu-box:8000/v1"
    assert remote.api_key_env == "MY_KEY"
    assert "pa55word" not in repr(remote) and "pa55word" not in json.dumps(remote.describe())
    plain = parse_model("openai:gpt-4o-mini")
    assert (plain.name, plain.model, plain.base_url) == ("gpt-4o-mini", "gpt-4o-mini", None)
    assert plain.api_key_env == "OPENAI_API_KEY"


def test_folders_that_are_not_llava_fail_fast(tmp_path, tiny_llava, monkeypatch):
    import ray

    def no_ray(*a, **k):
        raise AssertionError("Ray was used before the model folder was checked")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray.data, "from_arrow", no_ray)

    def fails(folder, *phrases):
        with pytest.raises(ModelError) as e:
            predict_local(make_items(1), folder, "m")
        for phrase in phrases:
            assert phrase in str(e.value), str(e.value)
        with pytest.raises(ModelError):
            parse_model(str(folder))
        return str(e.value)

    fails(tmp_path / "nowhere", "does not exist", "raypipe-tiny/tiny-llava")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(empty, "no config.json")
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "config.json").write_text("{}")
    fails(run, "training run's folder", str(run / "export"))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    fails(llama, "'llama' model, not a LLaVA", "llava-hf/llava-1.5-7b-hf")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    fails(broken, "not readable JSON")

    # A LLaVA config whose weights are pickled, and one without a chat template.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (pickled / "pytorch_model.bin").write_bytes(b"")
    fails(pickled, "no safetensors weights", "never pickled")
    untemplated = tmp_path / "untemplated"
    untemplated.mkdir()
    for f in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json"):
        (untemplated / f).write_bytes((Path(tiny_llava) / f).read_bytes())
    fails(untemplated, "no chat template")
    assert check_local_model(tiny_llava).name == "tiny-llava-v2"


# ---------------------------------------------------------------------------------------
# The tiny LLaVA
# ---------------------------------------------------------------------------------------


def test_predictor_in_process_is_greedy_and_matches_bare_generate(tiny_llava, bench):
    items = read_benchmark(bench)
    stage = LlavaPredictor(tiny_llava, "tiny", batch_size=4, max_new_tokens=8, device="cpu")
    first = stage(items).to_pylist()
    check_rows(first, items, "tiny")
    assert untimed(stage(items).to_pylist()) == untimed(first)
    # Batches of 4 + 2 with prompts of different lengths: left padding at work.
    lengths = {r["prompt_tokens"] for r in first}
    assert len(lengths) > 1
    assert [r["prediction"] for r in first] == bare_generate(tiny_llava, items, 4, 8)
    # The prompt is the model's template with one image placeholder; one BOS only.
    prompt = stage.prompt("Is it red?")
    assert prompt.count("<image>") == 1 and prompt.endswith("ASSISTANT:")
    ids = stage.processor(
        images=[Image.new("RGB", (32, 32))], text=[prompt], add_special_tokens=False
    )["input_ids"][0]
    assert list(ids).count(stage.processor.tokenizer.bos_token_id) == 1


def test_an_undecodable_image_is_that_items_error(tiny_llava):
    items = make_items(3).to_pylist()
    items[1]["image"] = {"bytes": b"not an image", "path": None}
    table = items_to_table(items)
    stage = LlavaPredictor(tiny_llava, "tiny", batch_size=4, max_new_tokens=4, device="cpu")
    rows = stage(table).to_pylist()
    assert rows[1]["prediction"] is None and rows[1]["error"].startswith("image: ")
    assert rows[1]["completion_tokens"] == 0
    assert all(isinstance(rows[i]["prediction"], str) and not rows[i]["error"] for i in (0, 2))


@pytest.mark.slow
def test_actor_pool_predictions_are_deterministic_and_match_generate(ray_local, tiny_llava, bench):
    items = read_benchmark(bench)
    kw = dict(batch_size=4, max_new_tokens=8, device="cpu")
    first = predict_local(bench, "raypipe-tiny/tiny-llava", **kw)
    check_rows(first, items, "tiny-llava")
    second = predict_local(items, tiny_llava, "tiny-llava", **kw)
    assert untimed(second) == untimed(first)
    assert [r["prediction"] for r in first] == bare_generate(tiny_llava, items, 4, 8)
    # The rows are what the report scores.
    result = scores(score_rows(first))
    assert result["models"]["tiny-llava"]["benchmarks"]["synthetic"]["overall"]["n"] == 6


# ---------------------------------------------------------------------------------------
# An OpenAI-compatible vision endpoint
# ---------------------------------------------------------------------------------------


class VisionResponder:
    """Answers from the image it is sent: its colour, and yes/no for "Is the square X?"."""

    def __init__(self) -> None:
        self.contents: list = []

    def __call__(self, messages: list[dict]) -> str:
        content = messages[-1]["content"]
        if isinstance(content, str):  # the client's reachability check
            return "pong"
        self.contents.append(content)
        url = next(p["image_url"]["url"] for p in content if p["type"] == "image_url")
        question = next(p["text"] for p in content if p["type"] == "text")
        head, data = url.split(",", 1)
        assert head == "data:image/png;base64"
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            pixel = img.convert("RGB").getpixel((0, 0))
        colour = next(c for c, rgb in COLOURS.items() if rgb == pixel)
        asked = re.match(r"Is the square (\w+)\?", question)
        if asked:
            return "Yes, it is." if asked.group(1) == colour else "No."
        return f"It is a {colour} square."


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    return SENTINEL


def client_settings(**over) -> LLMConfig:
    fields = dict(
        concurrency=4,
        max_attempts=2,
        timeout_s=5.0,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
        prices={"tiny-vision": (1.0, 2.0)},
    )
    fields.update(over)
    return LLMConfig(**fields)


def test_endpoint_predictions_then_the_cache(llm_server, bench, tmp_path, api_key, caplog):
    caplog.set_level(logging.DEBUG)
    responder = VisionResponder()
    server = llm_server(responder=responder, api_key=SENTINEL, models=["tiny-vision"])
    model = parse_model(f"vision=openai:tiny-vision@{server.url}", api_key_env=KEY_ENV)
    items = read_benchmark(bench)
    cache = tmp_path / "cache"

    rows = predict_openai(bench, model, cache, llm=client_settings(), max_new_tokens=16)
    check_rows(rows, items, "vision")
    assert server.total_requests == 7  # one per item, and the client's one-token check
    assert len(responder.contents) == 6
    assert not any(r["cached"] for r in rows) and all(r["cost_usd"] > 0 for r in rows)
    # The OpenAI vision message form: the image as a data URL, then the question.
    assert [p["type"] for p in responder.contents[0]] == ["image_url", "text"]
    sent = {c[1]["text"] for c in responder.contents}
    assert sent == set(items.column("question").to_pylist())
    assert responder.contents[0][0]["image_url"]["url"] in {
        image_data_url(r["image"]["bytes"]) for r in items.to_pylist()
    }
    # The endpoint reads every image right: the keyword scorer gives it every item.
    overall = scores(score_rows(rows))["models"]["vision"]["benchmarks"]["synthetic"]["overall"]
    assert overall["correct"] == overall["n"] == 6

    again = predict_openai(bench, model, cache, llm=client_settings(), max_new_tokens=16)
    assert server.total_requests == 7  # no request, not even the check: all from the cache
    assert all(r["cached"] and r["cost_usd"] == 0 for r in again)
    assert [r["prediction"] for r in again] == [r["prediction"] for r in rows]
    assert [r["prompt_tokens"] for r in again] == [r["prompt_tokens"] for r in rows]
    assert SENTINEL not in caplog.text
    assert SENTINEL not in json.dumps(rows) + json.dumps(again)


def test_endpoint_failures_are_rows_with_errors(llm_server, api_key):
    items = make_items(3)
    doomed = items.column("question").to_pylist()[1]

    def fault(digest, attempt, body):
        parts = body["messages"][-1]["content"]
        return "400" if isinstance(parts, list) and parts[1]["text"] == doomed else None

    server = llm_server(responder=VisionResponder(), fault_fn=fault, models=["tiny-vision"])
    model = parse_model(f"openai:tiny-vision@{server.url}", api_key_env=KEY_ENV)
    rows = predict_openai(items, model, None, llm=client_settings())
    assert rows[1]["prediction"] is None and rows[1]["error"].startswith("http_400")
    assert [rows[0]["error"], rows[2]["error"]] == [None, None]
    assert rows[0]["prediction"] == "It is a blue square."


@pytest.mark.slow
def test_predict_then_score_jobs_compare_two_models(ray_local, tiny_llava, bench, tmp_path):
    """jobs/evaluate.py predict (two names for the tiny LLaVA) -> score -> the report."""
    import json
    from pathlib import Path

    from raypipe.jobs import evaluate as job

    pred = tmp_path / "pred"
    args = ["predict", "--bench", bench, "--model", f"a={tiny_llava}", "--model", f"b={tiny_llava}"]
    assert job.main([*args, "--out", str(pred), "--max-new-tokens", "8"]) == 0
    models = json.loads((pred / "models.json").read_text())
    assert set(models) == {"a", "b"} and models["a"]["kind"] == "local"
    report = tmp_path / "report"
    assert (
        job.main(
            ["score", "--predictions", str(pred / "predictions.parquet"), "--out", str(report)]
        )
        == 0
    )
    scores = json.loads((report / "scores.json").read_text())
    assert set(scores["models"]) == {"a", "b"}
    assert scores["models"]["a"]["kind"] == "local" and "lineage" in scores["models"]["a"]
    assert Path(scores["models"]["a"]["path"]).name == Path(tiny_llava).name
    for entry in scores["models"].values():
        (bench_scores,) = entry["benchmarks"].values()
        assert bench_scores["overall"]["n"] == 6
    assert (report / "abilities.png").stat().st_size > 10_000

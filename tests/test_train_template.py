"""Exports that serve: their chat template renders the training ids token for token.

Golden tests on exported tiny models (``vicuna_v1`` and ``plain``, string and list-of-parts
content, one and three turns), the ``plain`` label mask, empty answers, and the export's
lineage (dataset manifests and their hashes).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_conversation import MULTI as _CONVERSATION_MULTI

from raypipe.chat_templates import PLAIN_CHAT_TEMPLATE, VICUNA_V1_CHAT_TEMPLATE
from raypipe.config import build_config
from raypipe.errors import ConfigError
from raypipe.train.config import TrainConfig
from raypipe.train.conversation import (
    DROP_EMPTY_ANSWER,
    IGNORE_INDEX,
    ConversationRenderer,
    Rendered,
    chat_template_for,
    normalize_image_placeholder,
    render_conversation,
)

LATER_TURNS = _CONVERSATION_MULTI[2:]
SINGLE = [
    {"from": "human", "value": "What colour is the square?\n<image>"},
    {"from": "gpt", "value": "It is a red square."},
]
MULTI = SINGLE + LATER_TURNS  # <image> after the question here, before it there
CONVERSATIONS = {"single": SINGLE, "multi": MULTI}
#: What the base had before the export: the export must replace it.
OTHER_TEMPLATE = "{% for m in messages %}{{ m['role'] }}{% endfor %}"


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    import torch.distributed as dist

    pg = tmp_path_factory.mktemp("pg")
    dist.init_process_group("gloo", init_method=f"file://{pg}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A raypipe generation run (OUT with manifest.json) and a LLaVA JSON."""
    from fixture_data import write_fixture_llava_json, write_fixture_run

    root = tmp_path_factory.mktemp("datasets")
    run = write_fixture_run(str(root / "run"), 6)
    llava = write_fixture_llava_json(root / "llava", 3)
    return Path(run), llava


def _export(root: Path, template: str, lineage=None) -> tuple[Path, object]:
    import torch

    from raypipe.train.export import export_hf
    from raypipe.train.model import build_model

    cfg = build_config(
        TrainConfig,
        {
            "name": f"tiny-{template}",
            "model": {"llava": "raypipe-tiny/tiny-llava"},
            "data": {"template": template},
        },
    )
    torch.manual_seed(0)
    model, processor = build_model(cfg)
    processor.chat_template = OTHER_TEMPLATE
    processor.tokenizer.chat_template = OTHER_TEMPLATE
    out = export_hf(model, processor, cfg, root / template, rank=0, lineage=lineage)
    assert out == root / template
    return out, processor


@pytest.fixture(scope="module")
def exports(tiny_dir, process_group, tmp_path_factory, dataset):
    """Exports of the tiny LLaVA trained as vicuna_v1, plain and chat_template."""
    from raypipe.train.export import dataset_lineage

    run, llava = dataset
    root = tmp_path_factory.mktemp("exports")
    lineage = {"datasets": dataset_lineage([str(run / "data"), str(llava)]), "steps": 3}
    out = {}
    for template in ("vicuna_v1", "plain", "chat_template"):
        folder, processor = _export(root, template, lineage)
        # The caller's processor keeps its own template.
        assert processor.chat_template == OTHER_TEMPLATE
        assert processor.tokenizer.chat_template == OTHER_TEMPLATE
        out[template] = folder
    return out


def _messages(turns, content: str, image=None) -> list[dict]:
    """OpenAI-style messages of LLaVA turns; "parts": the image as a part, first."""
    messages = []
    for turn in turns:
        role = "user" if turn["from"] == "human" else "assistant"
        text = turn["value"]
        if content == "string":
            messages.append({"role": role, "content": text})
            continue
        parts = [{"type": "text", "text": text.replace("<image>", "").strip()}]
        if "<image>" in text:
            part = {"type": "image"} if image is None else {"type": "image", "image": image}
            parts.append(part)  # after the text: the template puts images first
        messages.append({"role": role, "content": parts})
    return messages


def _training(turns, tokenizer, template: str, num_image_tokens: int) -> Rendered:
    normalized = normalize_image_placeholder(turns)
    rendered = render_conversation(normalized, tokenizer, template, num_image_tokens)
    assert isinstance(rendered, Rendered), rendered
    return rendered


def _answer_starts(rendered: Rendered) -> list[int]:
    labels = rendered.labels
    return [
        i
        for i, label in enumerate(labels)
        if label != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)
    ]


def _expand(ids: list[int], image_token_id: int, n: int) -> list[int]:
    out = []
    for token in ids:
        out += [token] * n if token == image_token_id else [token]
    return out


def _apply(tokenizer_or_processor, messages, **kwargs) -> list[int]:
    out = tokenizer_or_processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, **kwargs
    )
    ids = out["input_ids"]
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    return ids[0] if ids and isinstance(ids[0], list) else ids


# --- golden tests on the exports ------------------------------------------------------


@pytest.mark.parametrize("template", ["vicuna_v1", "plain"])
@pytest.mark.parametrize("content", ["string", "parts"])
@pytest.mark.parametrize("kind", sorted(CONVERSATIONS))
def test_exported_tokenizer_template_gives_the_training_ids(exports, template, content, kind):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exports[template])
    image_id = tok.convert_tokens_to_ids("<image>")
    turns = CONVERSATIONS[kind]
    rendered = _training(turns, tok, template, 16)
    messages = _messages(turns, content)
    # The whole conversation: every token, in order.
    full = _expand(_apply(tok, messages), image_id, 16)
    if template == "plain":  # the format is one (image, caption) pair
        assert full == _training(turns[:2], tok, template, 16).input_ids
    assert full == rendered.input_ids
    # Each generation prompt ends where training's answer starts.
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    starts = _answer_starts(rendered)
    for user, start in zip(users, starts):
        prompt = _apply(tok, messages[: user + 1], add_generation_prompt=True)
        assert _expand(prompt, image_id, 16) == rendered.input_ids[:start]


@pytest.mark.parametrize("template", ["vicuna_v1", "plain"])
@pytest.mark.parametrize("kind", sorted(CONVERSATIONS))
def test_exported_processor_template_gives_the_training_ids(exports, image, template, kind):
    """processor.apply_chat_template with an image part: the processor expands <image>."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(exports[template])
    turns = CONVERSATIONS[kind]
    n_image = (
        processor(text=["<image>"], images=[image], return_tensors="np")["input_ids"][0]
        .tolist()
        .count(processor.image_token_id)
    )
    rendered = _training(turns, processor.tokenizer, template, n_image)
    messages = _messages(turns, "parts", image=image)
    assert _apply(processor, messages) == rendered.input_ids
    prompt = _apply(processor, messages[:1], add_generation_prompt=True)
    assert prompt == rendered.input_ids[: _answer_starts(rendered)[0]]
    # The text alone, as vLLM renders it before tokenising.
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text == processor.tokenizer.apply_chat_template(messages, tokenize=False)


def test_exports_carry_the_training_format_whatever_the_base_had(exports):
    from transformers import AutoProcessor, AutoTokenizer

    expected = {"vicuna_v1": VICUNA_V1_CHAT_TEMPLATE, "plain": PLAIN_CHAT_TEMPLATE}
    for template, jinja in expected.items():
        assert AutoTokenizer.from_pretrained(exports[template]).chat_template == jinja
        assert AutoProcessor.from_pretrained(exports[template]).chat_template == jinja
    # chat_template: the base's own template is the format, kept as it was.
    kept = exports["chat_template"]
    assert AutoTokenizer.from_pretrained(kept).chat_template == OTHER_TEMPLATE
    assert AutoProcessor.from_pretrained(kept).chat_template == OTHER_TEMPLATE


def test_export_writes_lineage_and_model_card(exports, dataset):
    from raypipe.train.export import LINEAGE_FILE

    run, llava = dataset
    folder = exports["plain"]
    record = json.loads((folder / LINEAGE_FILE).read_text())
    assert record["base_models"] == ["raypipe-tiny/tiny-llava"]
    assert record["template"] == "plain" and record["stage"] == 1 and record["steps"] == 3
    assert record["config"]["data"]["template"] == "plain"
    manifest_sha = hashlib.sha256((run / "manifest.json").read_bytes()).hexdigest()
    json_sha = hashlib.sha256(llava.read_bytes()).hexdigest()
    assert [(d["kind"], d["manifest_sha256"]) for d in record["datasets"]] == [
        ("raypipe", manifest_sha),
        ("json", json_sha),
    ]
    assert record["datasets"][0]["manifest"]["accepted"] == 6
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "`plain`" in card and manifest_sha in card and json_sha in card
    assert "raypipe-tiny/tiny-llava" in card and LINEAGE_FILE in card


# --- the templates themselves -----------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoProcessor

    from raypipe.tiny import resolve_tiny

    return AutoProcessor.from_pretrained(resolve_tiny("raypipe-tiny/tiny-llava")).tokenizer


def test_tiny_models_template_takes_list_content(tokenizer):
    """The tiny models' template (once ``'USER: ' + content``) reads parts as strings."""
    from raypipe.tiny import LLAMA_CHAT_TEMPLATE

    assert tokenizer.chat_template == LLAMA_CHAT_TEMPLATE == VICUNA_V1_CHAT_TEMPLATE
    parts = tokenizer.apply_chat_template(
        _messages(MULTI, "parts"), tokenize=False, add_generation_prompt=False
    )
    string = tokenizer.apply_chat_template(_messages(MULTI, "string"), tokenize=False)
    assert parts == string
    assert "USER: <image>\nWhat colour is the square? ASSISTANT: It is a red square.</s>" in parts


def test_vicuna_template_system_message_as_the_renderer(tokenizer):
    messages = _messages(SINGLE, "parts")
    for system in ("You are terse.", ""):
        rendered = ConversationRenderer(tokenizer, "vicuna_v1", system=system).render(
            normalize_image_placeholder(SINGLE), 1
        )
        with_system = [{"role": "system", "content": system}] + messages
        assert _apply(tokenizer, with_system) == rendered.input_ids
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": ""}] + messages, tokenize=False
    )
    assert (
        text == "<s> USER: <image>\nWhat colour is the square? ASSISTANT: It is a red square.</s>"
    )


def test_chat_template_for_fits_the_tokenizer_word_start(tokenizer):
    """Tokenizers that mark every word start (Llama's legacy mode) get no space after BOS."""
    import copy

    from tokenizers import normalizers, pre_tokenizers

    assert chat_template_for("vicuna_v1", tokenizer) == VICUNA_V1_CHAT_TEMPLATE
    assert chat_template_for("plain", tokenizer) == PLAIN_CHAT_TEMPLATE
    assert chat_template_for("chat_template", tokenizer) is None
    legacy = copy.deepcopy(tokenizer)
    legacy.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="never", split=False
    )
    legacy.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    for template in ("vicuna_v1", "plain"):
        jinja = chat_template_for(template, legacy)  # checked against the training ids
        text = legacy.apply_chat_template(
            _messages(SINGLE, "parts"), chat_template=jinja, tokenize=False
        )
        assert text.startswith("<s>A chat" if template == "vicuna_v1" else "<s><image>It is")
    with pytest.raises(ConfigError, match="vicuna_v1"):
        chat_template_for("alpaca", tokenizer)


def test_chat_template_that_misses_the_training_ids_is_refused(tokenizer, monkeypatch):
    from raypipe.errors import ModelError
    from raypipe.train import conversation

    # No space after BOS: this tokenizer would then split the system prompt's first word.
    monkeypatch.setattr(conversation, "word_start_after", lambda tokenizer, token: "")
    with pytest.raises(ModelError, match="does not reproduce the training ids"):
        chat_template_for("vicuna_v1", tokenizer)


# --- plain --------------------------------------------------------------------------------


def test_plain_is_image_tokens_caption_eos_with_loss_on_caption_only(tokenizer):
    rendered = _training(MULTI, tokenizer, "plain", 16)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    caption = tokenizer(" It is a red square.</s>", add_special_tokens=False)["input_ids"]
    assert rendered.input_ids == [tokenizer.bos_token_id] + [image_id] * 16 + caption
    assert rendered.labels == [IGNORE_INDEX] * 17 + caption
    # As LLaVA tokenises the caption: on its own, its first word whole.
    assert caption == tokenizer("It is a red square.</s>", add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(rendered.input_ids)
    assert "What colour" not in text and "USER" not in text and "A chat" not in text


# --- empty answers --------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["vicuna_v1", "plain", "chat_template"])
@pytest.mark.parametrize("answer", ["", "  \n "])
def test_empty_answer_turn_drops_the_row_with_its_reason(tokenizer, template, answer):
    empty_first = [SINGLE[0], {"from": "gpt", "value": answer}]
    empty_later = MULTI[:3] + [{"from": "gpt", "value": answer}] + MULTI[4:]
    for turns in (empty_first, empty_later):
        dropped = render_conversation(normalize_image_placeholder(turns), tokenizer, template, 16)
        assert not dropped and dropped.reason == DROP_EMPTY_ANSWER


def test_sample_encoder_reports_empty_answers(tiny_dir):
    from raypipe.tiny import resolve_tiny
    from raypipe.train.encoding import SampleEncoder

    encoder = SampleEncoder(resolve_tiny("raypipe-tiny/tiny-llava"), "vicuna_v1", 128)
    row = {"conversations": [SINGLE[0], {"from": "gpt", "value": " "}]}
    assert encoder.encode_text(row)["drop_reason"] == DROP_EMPTY_ANSWER


# --- dataset lineage ------------------------------------------------------------------------


def test_dataset_lineage_finds_the_run_manifest(dataset, tmp_path):
    from raypipe.train.export import dataset_lineage

    run, llava = dataset
    sha = hashlib.sha256((run / "manifest.json").read_bytes()).hexdigest()
    part = sorted((run / "data").glob("part-*.parquet"))[0]
    sources = [str(run), str(run / "data"), str(part), f"file://{run / 'data'}"]
    for entry, source in zip(dataset_lineage(sources), sources):
        assert entry["path"] == source and entry["kind"] == "raypipe"
        assert entry["manifest_sha256"] == sha and entry["manifest"]["raypipe_manifest"] == 2
    (entry,) = dataset_lineage([str(llava)])
    assert entry == {
        "path": str(llava),
        "kind": "json",
        "manifest": None,
        "manifest_sha256": hashlib.sha256(llava.read_bytes()).hexdigest(),
    }
    # Parquet without a run around it: no manifest, said so.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "x.parquet").write_bytes(part.read_bytes())
    (entry,) = dataset_lineage([str(bare)])
    assert entry["manifest"] is None and entry["manifest_sha256"] is None
    with pytest.raises(ConfigError, match="does not exist"):
        dataset_lineage([str(tmp_path / "missing")])


def test_dataset_lineage_on_s3(s3_server):
    from fixture_data import write_fixture_run

    from raypipe.train.export import dataset_lineage

    bucket = s3_server.make_bucket("lineage")
    out = write_fixture_run(s3_server.uri(bucket, "run1"), 3)
    fs = s3_server.filesystem()
    with fs.open_input_stream(f"{bucket}/run1/manifest.json") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    data = s3_server.uri(bucket, "run1/data")
    entries = dataset_lineage([out, data])
    assert [e["manifest_sha256"] for e in entries] == [sha, sha]
    assert [e["path"] for e in entries] == [out, data]

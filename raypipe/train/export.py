"""Export a trained (sharded) LLaVA in Hugging Face format.

The folder holds ``model.safetensors`` (or shards), ``config.json``,
``generation_config.json`` and the processor files, and loads with plain
``LlavaForConditionalGeneration.from_pretrained`` / ``AutoProcessor.from_pretrained``.
LoRA adapters are merged into the LLM's weights first, so the export needs no peft.

The tokenizer and processor carry the chat template of the format the model was trained
with (``data.template``; see :func:`raypipe.train.conversation.chat_template_for`), so
``processor.apply_chat_template``, transformers pipelines and ``vllm serve`` prompt it as
it learned. ``raypipe_lineage.json`` and the model card ``README.md`` record what it was
trained from: base models, format, config, and the datasets' manifests with their hashes
(:func:`dataset_lineage`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
import torch
import yaml
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from raypipe import storage
from raypipe.config import redacted
from raypipe.errors import ConfigError
from raypipe.train.conversation import chat_template_for
from raypipe.train.model import build_model, dtype_of

if TYPE_CHECKING:
    from raypipe.train.config import TrainConfig


def gather_full_state_dict(model) -> dict[str, torch.Tensor]:
    """Full (unsharded) state dict on rank 0's CPU; empty on other ranks. Collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def plain_model_from_state_dict(cfg: TrainConfig, state_dict: dict[str, torch.Tensor]):
    """A ``LlavaForConditionalGeneration`` (no peft, no FSDP) holding ``state_dict``.

    The architecture is rebuilt on the meta device from ``cfg`` and the tensors assigned
    (no copy); LoRA adapters, if any, are merged and removed. Non-persistent buffers
    (rotary frequencies, position ids) stay on the meta device: the model is for
    ``save_pretrained``, and ``from_pretrained`` recomputes them.
    """
    model, _ = build_model(cfg, on_meta=True)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if unexpected or missing:
        raise RuntimeError(
            f"state dict does not match the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}"
        )
    if cfg.lora is not None:
        model = model.merge_and_unload()
    return model


def export_hf(
    model,
    processor,
    cfg: TrainConfig,
    out_dir: str | Path,
    rank: int,
    lineage: dict[str, Any] | None = None,
) -> Path | None:
    """Gather ``model`` and write it with ``processor`` to ``out_dir`` (rank 0 writes).

    Collective: every rank must call it. Weights are saved in the run's compute dtype
    (bf16 on GPU runs, fp32 on CPU). The saved tokenizer and processor get the chat
    template of ``cfg.data.template`` (for ``chat_template``, the base's own), whatever
    template the base had: it is the format the weights learned. ``lineage`` (e.g.
    ``{"datasets": dataset_lineage(paths), "steps": 2180}``) is added to
    ``raypipe_lineage.json`` beside the base models, template and config, and the
    datasets are listed in ``README.md``. ``processor`` itself is left unchanged.
    Returns the folder on rank 0, None elsewhere. ModelError (before anything is written)
    if the format's template cannot reproduce the training ids with this tokenizer.
    """
    # 1. Gather shards into one CPU state dict on rank 0.
    state_dict = gather_full_state_dict(model)
    if rank != 0:
        return None
    # 2. Rebuild a plain model around it, merging LoRA.
    plain = plain_model_from_state_dict(cfg, state_dict)
    plain = plain.to(dtype_of(cfg.compute_dtype))
    plain.config.use_cache = True
    tokenizer = processor.tokenizer
    gen = plain.generation_config
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gen, key, None) is None:
            setattr(gen, key, getattr(tokenizer, key))
    # 3. The training format's chat template (checked against the training ids).
    image_token = getattr(processor, "image_token", None) or cfg.model.image_token
    chat_template = chat_template_for(cfg.data.template, tokenizer, image_token=image_token)
    # 4. Write weights (safetensors), config, processor, lineage and model card; to a
    #    local folder first when the destination is a URI, then upload it.
    if storage.is_uri(str(out_dir)):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="raypipe-export-") as tmp:
            _write(plain, processor, tokenizer, chat_template, cfg, lineage, Path(tmp))
            storage.upload_dir(tmp, str(out_dir))
        return str(out_dir)
    out_dir = Path(out_dir)
    _write(plain, processor, tokenizer, chat_template, cfg, lineage, out_dir)
    return out_dir


def _write(plain, processor, tokenizer, chat_template, cfg, lineage, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir, safe_serialization=True)
    saved = (tokenizer.chat_template, getattr(processor, "chat_template", None))
    try:
        if chat_template is not None:
            tokenizer.chat_template = chat_template
            processor.chat_template = chat_template
        processor.save_pretrained(out_dir)
    finally:
        tokenizer.chat_template, processor.chat_template = saved
    record = lineage_record(cfg, lineage)
    (out_dir / LINEAGE_FILE).write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    (out_dir / "README.md").write_text(model_card(record))


# ---------------------------------------------------------------------------------------
# Lineage
# ---------------------------------------------------------------------------------------

#: The export's record of what it was trained from (next to config.json).
LINEAGE_FILE = "raypipe_lineage.json"

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _sha256(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_lineage(source_paths: list[str]) -> list[dict[str, Any]]:
    """What each training source is, as recorded in an export's lineage.

    ``source_paths`` are data source paths (local or pyarrow filesystem URIs such as
    ``s3://bucket/run1/data``; no ``:IMAGE_FOLDER`` or ``@WEIGHT``). For a raypipe
    generation run (``OUT``, ``OUT/data`` or one of its Parquet files) the run's
    ``OUT/manifest.json`` is read: ``{"path", "kind": "raypipe", "manifest",
    "manifest_sha256"}`` (manifest and hash None when the run has none). For a JSON source
    (LLaVA or StableLLaVA) ``{"path", "kind": "json", "manifest": None,
    "manifest_sha256"}`` holds the hash of the JSON file itself. Raises ConfigError for a
    path that does not exist.
    """
    out = []
    for location in source_paths:
        location = str(location)
        fs, path = storage.open_location(location)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise ConfigError(
                f"data source {location!r} does not exist; give the paths the run trained on"
            )
        if info.type == pafs.FileType.File and path.endswith((".json", ".jsonl")):
            sha = _sha256(fs, path)
            out.append({"path": location, "kind": "json", "manifest": None, "manifest_sha256": sha})
            continue
        # OUT/manifest.json from OUT, OUT/data or OUT/data/part-*.parquet.
        folder = path if info.type == pafs.FileType.Directory else path.rsplit("/", 1)[0]
        candidates = [f"{folder}/manifest.json", f"{folder.rsplit('/', 1)[0]}/manifest.json"]
        entry = {"path": location, "kind": "raypipe", "manifest": None, "manifest_sha256": None}
        for candidate in candidates:
            if fs.get_file_info(candidate).type == pafs.FileType.File:
                data = storage.read_bytes(fs, candidate)
                entry["manifest"] = json.loads(data)
                entry["manifest_sha256"] = hashlib.sha256(data).hexdigest()
                break
        out.append(entry)
    return out


def _base_models(cfg: TrainConfig) -> list[str]:
    spec = cfg.model
    return [spec.llava] if spec.llava is not None else [spec.vision_tower, spec.llm]


def lineage_record(cfg: TrainConfig, lineage: dict[str, Any] | None = None) -> dict[str, Any]:
    """The content of ``raypipe_lineage.json``: base models, template, stage, weight dtype,
    config (secrets redacted) and the caller's ``lineage`` keys (``datasets``, ...)."""
    record: dict[str, Any] = {
        "raypipe_lineage": 1,
        "base_models": _base_models(cfg),
        "template": cfg.data.template,
        "stage": cfg.stage,
        "dtype": cfg.compute_dtype,
        "config": cfg.model_dump(mode="json"),
        "datasets": [],
    }
    record.update(lineage or {})
    return redacted(record)


def model_card(record: dict[str, Any]) -> str:
    """A short Hugging Face model card (``README.md``) from a lineage record."""
    cfg = record.get("config", {})
    bases = [str(b) for b in record.get("base_models", [])]
    meta = {
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["llava", "raypipe"],
    }
    hub = [b for b in bases if _HUB_ID.match(b) and not b.startswith("raypipe-tiny/")]
    if hub:
        meta["base_model"] = hub
    stage = record.get("stage")
    what = {1: "projector only (feature alignment)", 2: "projector and LLM"}.get(stage, "")
    if cfg.get("lora"):
        what += f", LoRA rank {cfg['lora'].get('rank')} merged into the LLM"
    data = cfg.get("data", {})
    template = record.get("template")
    rows = [
        ["stage", f"{stage}: {what}"],
        ["template", template],
        ["epochs / max_steps", f"{cfg.get('epochs')} / {cfg.get('max_steps')}"],
        [
            "global batch (micro x workers)",
            f"{cfg.get('global_batch_size')} "
            f"({cfg.get('micro_batch_size')} x {cfg.get('num_workers')})",
        ],
        [
            "lr, warm-up, weight decay",
            f"{cfg.get('lr')}, {cfg.get('warmup_ratio')}, {cfg.get('weight_decay')}",
        ],
        ["max_length, pad_to_square", f"{data.get('max_length')}, {data.get('pad_to_square')}"],
        ["weights", record.get("dtype")],
        ["seed", cfg.get("seed")],
    ]
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {cfg.get('name', 'raypipe export')}",
        "",
        "A LLaVA tuned with raypipe (Ray Train) from " + ", ".join(f"`{b}`" for b in bases) + ".",
        "",
        "## Prompt format",
        "",
        f"Trained with the `{template}` conversation format. The chat template saved with "
        "the tokenizer and processor renders it, so `processor.apply_chat_template(messages,"
        ' add_generation_prompt=True)` (content as a string, or as `{"type": "image"}` '
        'and `{"type": "text"}` parts) gives the prompt the model was trained on.',
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "## Data",
        "",
    ]
    datasets = record.get("datasets") or []
    for d in datasets:
        sha = d.get("manifest_sha256")
        what = "manifest sha256" if d.get("kind") == "raypipe" else "file sha256"
        lines.append(f"- `{d.get('path')}` ({d.get('kind')}): {what} `{sha or 'none'}`")
    if not datasets:
        lines.append("Not recorded.")
    for plan in record.get("plans") or []:
        if plan.get("new_plan"):
            lines.append(
                f"- from step {plan.get('from_step')}, a new plan (`--new-plan`) started from "
                f"the weights of `{plan.get('checkpoint')}`: " + "; ".join(plan.get("changes", []))
            )
    lines += [
        "",
        f"The full config and the dataset manifests are in `{LINEAGE_FILE}`.",
        "",
    ]
    return "\n".join(lines)


__all__ = [
    "LINEAGE_FILE",
    "dataset_lineage",
    "export_hf",
    "gather_full_state_dict",
    "lineage_record",
    "model_card",
    "plain_model_from_state_dict",
]

"""The dataset card of a generation run: OUT/README.md and OUT/preview.png.

    write_card(store, manifest)  # after the manifest is written

``README.md`` is a Hugging Face dataset card. Its YAML front matter names
``data/*.parquet`` as the only data files of the ``train`` split (so
``datasets.load_dataset("OUT")`` does not mix in OUT/rejects) and types every column,
the image column as ``Image``; its body says what the data is, which models made it,
the counts per ability, the reject reasons, how to load it and the config.

``preview.png`` is a contact sheet: up to :data:`PER_ABILITY` images per ability, each
labelled with its ability and keyword. Only the row groups that hold the chosen rows
have their image column read, so the card costs the same for 100 rows or 10 million.
"""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from raypipe.generate.store import OutputStore
from raypipe.schema import IMAGE_TYPE, SAMPLE_SCHEMA

__all__ = ["PER_ABILITY", "PREVIEW_THUMB", "preview_size", "size_category", "write_card"]

#: Images per ability on the contact sheet.
PER_ABILITY = 4
#: Side of one thumbnail, the height of its label band, and the gap between cells (px).
PREVIEW_THUMB = 128
PREVIEW_LABEL = 30
PREVIEW_PAD = 6

#: Hugging Face's ``size_categories`` buckets: (upper bound, tag).
_SIZE_BUCKETS = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
    (10_000_000_000, "1B<n<10B"),
    (100_000_000_000, "10B<n<100B"),
    (1_000_000_000_000, "100B<n<1T"),
)

_LICENSE_LINE = (
    "license:  # FILL IN before sharing. Images inherit the text-to-image model's license "
    "(e.g. CreativeML OpenRAIL-M for SD 1.5), text the LLM provider's terms; raypipe "
    "cannot choose for you."
)


def size_category(n: int) -> str:
    """The ``size_categories`` tag of a dataset of ``n`` rows."""
    for bound, tag in _SIZE_BUCKETS:
        if n < bound:
            return tag
    return "n>1T"


def preview_size(n_abilities: int, per_row: int) -> tuple[int, int]:
    """(width, height) in px of a contact sheet of ``n_abilities`` rows of ``per_row`` cells."""
    cell_w, cell_h = PREVIEW_THUMB + PREVIEW_PAD, PREVIEW_THUMB + PREVIEW_LABEL + PREVIEW_PAD
    return per_row * cell_w + PREVIEW_PAD, n_abilities * cell_h + PREVIEW_PAD


def write_card(store: OutputStore, manifest: dict[str, Any]) -> None:
    """Write OUT/preview.png (when OUT/data has rows) and OUT/README.md."""
    # 1. Preview: a few rows per ability, images read only for those rows.
    picked = _pick_preview_rows(store, manifest)
    has_preview = bool(picked)
    if has_preview:
        _write_bytes(store, "preview.png", _contact_sheet(picked))
    # 2. The card.
    text = "---\n" + _front_matter(manifest) + "---\n\n" + _body(store, manifest, has_preview)
    _write_bytes(store, "README.md", text.encode())


# ------------------------------------------------------------------------------------
# Front matter
# ------------------------------------------------------------------------------------


def _feature(field: pa.Field) -> dict[str, Any]:
    """One column in the card's ``dataset_info.features`` (the ``datasets`` YAML form)."""
    out: dict[str, Any] = {"name": field.name}
    out.update(_feature_type(field.type))
    return out


def _feature_type(t: pa.DataType) -> dict[str, Any]:
    if t.equals(IMAGE_TYPE):
        return {"dtype": "image"}
    if pa.types.is_list(t):
        inner = t.value_type
        if pa.types.is_struct(inner):
            return {"list": [_feature(inner.field(i)) for i in range(inner.num_fields)]}
        return {"list": _feature_type(inner)["dtype"]}
    if pa.types.is_struct(t):
        return {"struct": [_feature(t.field(i)) for i in range(t.num_fields)]}
    if pa.types.is_string(t):
        return {"dtype": "string"}
    if pa.types.is_binary(t):
        return {"dtype": "binary"}
    # int32, int64, float32, ... are spelt as arrow spells them.
    return {"dtype": str(t)}


def _front_matter(manifest: dict[str, Any]) -> str:
    accepted = int(manifest.get("counts", {}).get("accepted", 0))
    meta = {
        "pretty_name": f"StableLLaVA-style synthetic visual instructions ({accepted} rows)",
        "language": ["en"],
        "task_categories": ["image-text-to-text", "visual-question-answering"],
        "tags": [
            "synthetic",
            "visual-instruction-tuning",
            "llava",
            "stablellava",
            "stable-diffusion",
            "raypipe",
        ],
        "size_categories": [size_category(accepted)],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": "train", "path": "data/*.parquet"}],
            }
        ],
        # No `splits:` block: `datasets` wants num_bytes there (decoded size), which
        # would mean reading every image; it counts the rows itself.
        "dataset_info": {"features": [_feature(f) for f in SAMPLE_SCHEMA]},
    }
    return _LICENSE_LINE + "\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)


# ------------------------------------------------------------------------------------
# Body
# ------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _body(store: OutputStore, manifest: dict[str, Any], has_preview: bool) -> str:
    parts = _intro(has_preview)
    parts += _models_and_counts(manifest)
    parts += _load_and_columns(store.uri, manifest.get("config", {}))
    versions = manifest.get("versions", {})
    if versions:
        parts += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    parts += [
        "",
        "## License",
        "",
        "Not set: fill in `license:` at the top of this file before sharing the data.",
        "",
    ]
    return "\n".join(parts)


def _intro(has_preview: bool) -> list[str]:
    parts = [
        "# Synthetic visual-instruction data (StableLLaVA method)",
        "",
        "One row is one image and one LLaVA-format dialogue about it. The data was "
        "synthesized with the StableLLaVA method (Li et al., 2023, "
        "[arXiv:2308.10253](https://arxiv.org/abs/2308.10253)) by raypipe: per visual "
        "ability, an LLM grew a keyword bank and wrote text-to-image prompts around those "
        "keywords, a text-to-image model rendered each prompt, and the LLM wrote the answer "
        "to a question about the image, grounded in the same prompt. Nothing here was "
        "photographed or written by a person; the text describes what the prompt asked "
        "for, which a rendered image may not show faithfully.",
        "",
    ]
    if has_preview:
        parts += ["![A few rows per ability](preview.png)", ""]
    return parts


def _models_and_counts(manifest: dict[str, Any]) -> list[str]:
    counts = manifest.get("counts", {})
    render = manifest.get("config", {}).get("render", {})
    models = manifest.get("models", {})
    accepted, wanted = counts.get("accepted", 0), manifest.get("num_samples", "?")
    parts = [
        "## Models",
        "",
        _table(
            ["role", "model"],
            [
                ["text-to-image", models.get("sd", render.get("model", "?"))],
                ["LLM (keywords, prompts, dialogues)", models.get("llm", "?")],
            ],
        ),
        "",
        f"Images: {render.get('width', '?')}x{render.get('height', '?')} px, "
        f"{render.get('steps', '?')} steps, guidance scale {render.get('guidance_scale', '?')}.",
        "",
        "## Counts",
        "",
        f"{accepted} rows accepted of {wanted} wanted; {counts.get('rejected', 0)} rejected "
        "(every rejected row is in `rejects/*.parquet` with its stage, reason and raw text).",
    ]
    if manifest.get("stopped"):
        parts.append(f"The run stopped early ({manifest['stopped']}); running it again continues.")
    abilities = counts.get("abilities", {})
    if abilities:
        parts += [
            "",
            _table(
                ["ability", "quota", "accepted", "rejected", "keywords"],
                [
                    [n, c.get("quota", ""), c.get("accepted", ""), c.get("rejected", "")]
                    + [c.get("keywords", "")]
                    for n, c in abilities.items()
                ],
            ),
        ]
    reasons = counts.get("reject_reasons", {})
    parts += ["", "### Reject reasons", ""]
    if reasons:
        rows = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        parts.append(_table(["stage:reason", "rows"], [list(kv) for kv in rows]))
    else:
        parts.append("No row was rejected.")

    llm = manifest.get("llm", {})
    if llm:
        parts += [
            "",
            f"LLM usage: {llm.get('prompt_tokens', 0):.0f} prompt and "
            f"{llm.get('completion_tokens', 0):.0f} completion tokens, "
            f"{llm.get('cost_usd', 0.0):.4f} USD.",
        ]

    return parts


def _load_and_columns(out: str, cfg: dict[str, Any]) -> list[str]:
    return [
        "",
        "## Load",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'ds = load_dataset("{out}", split="train")  # reads data/*.parquet only',
        'ds[0]["image"]  # a PIL image; ds[0]["conversations"]: [{"from", "value"}, ...]',
        "```",
        "",
        "or with pyarrow (files whose names start with `.` are temporary and skipped):",
        "",
        "```python",
        "import pyarrow.dataset as pads",
        "",
        f'table = pads.dataset("{out}/data", format="parquet").to_table(',
        '    columns=["id", "ability", "conversations"]  # leave out "image" unless needed',
        ")",
        "```",
        "",
        "## Columns",
        "",
        _table(["column", "type"], [[f.name, f"`{f.type}`"] for f in SAMPLE_SCHEMA]),
        "",
        "`image` is a struct of encoded `bytes` and `path`, the layout of the `datasets` "
        "Image feature. The first human turn of `conversations` starts with `<image>\\n`. "
        "`meta` is JSON: steps, guidance, timings, token counts, filter scores.",
        "",
        "## Config",
        "",
        _config_summary(cfg),
        "",
        "The full config (secrets redacted), package versions and timings are in `manifest.json`.",
    ]


def _config_summary(cfg: dict[str, Any]) -> str:
    llm, render, quality = cfg.get("llm", {}), cfg.get("render", {}), cfg.get("quality", {})
    abilities = cfg.get("abilities")
    rows = [
        ["seed", cfg.get("seed")],
        ["num_samples", cfg.get("num_samples")],
        ["abilities", ", ".join(abilities) if abilities else "all in the catalog"],
        ["prompts_per_request", cfg.get("prompts_per_request")],
        ["extra_keywords_per_ability", cfg.get("extra_keywords_per_ability")],
        ["near_duplicate_threshold", cfg.get("near_duplicate_threshold")],
        ["replace_budget", cfg.get("replace_budget")],
        ["max_usd", cfg.get("max_usd") or "no cap"],
        ["llm", f"{llm.get('backend')} / {llm.get('model')}, temperature {llm.get('temperature')}"],
        [
            "render",
            f"{render.get('model')}, {render.get('width')}x{render.get('height')}, "
            f"{render.get('steps')} steps, guidance {render.get('guidance_scale')}, "
            f"scheduler {render.get('scheduler') or 'model default'}, "
            f"{render.get('image_format')}",
        ],
        [
            "quality",
            f"CLIP filter {quality.get('clip_model')} >= {quality.get('clip_min_score')}"
            if quality.get("clip_model")
            else "pixel checks and keyword check; no CLIP filter",
        ],
    ]
    return _table(["field", "value"], [[k, "" if v is None else v] for k, v in rows])


# ------------------------------------------------------------------------------------
# Preview
# ------------------------------------------------------------------------------------


def _wanted_abilities(manifest: dict[str, Any]) -> list[str] | None:
    """Abilities with accepted rows, in manifest order; None = unknown (scan every part)."""
    abilities = manifest.get("counts", {}).get("abilities")
    if not abilities:
        return None
    return [n for n, c in abilities.items() if c.get("accepted", 0) > 0]


def _read_group(pf: pq.ParquetFile, group: int, columns: list[str]) -> pa.Table:
    return pf.read_row_group(group, columns=columns)


def _pick_preview_rows(
    store: OutputStore, manifest: dict[str, Any], per_ability: int = PER_ABILITY
) -> dict[str, list[tuple[str, bytes]]]:
    """{ability: [(keyword, image bytes), ...]}, at most ``per_ability`` each.

    Parts are visited in order, one row group at a time: the small ``ability`` column
    first, and the image column only of a group that holds a row still wanted. It
    stops once every ability with accepted rows has its share.
    """
    wanted = _wanted_abilities(manifest)
    picked: dict[str, list[tuple[str, bytes]]] = {n: [] for n in wanted or []}

    def done() -> bool:
        return wanted is not None and all(len(picked[n]) >= per_ability for n in wanted)

    for path in store._parts("data"):
        if done():
            break
        with store.fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            for group in range(pf.num_row_groups):
                if done():
                    break
                names = _read_group(pf, group, ["ability"]).column("ability").to_pylist()
                if not any(len(picked.get(n, [])) < per_ability for n in names):
                    continue
                table = _read_group(pf, group, ["ability", "keywords", "image"])
                for row in table.to_pylist():
                    name, image = row["ability"], row["image"]
                    have = picked.setdefault(name, [])
                    if len(have) < per_ability and image and image.get("bytes"):
                        have.append((", ".join(row["keywords"] or []), image["bytes"]))
    return {n: rows for n, rows in picked.items() if rows}


def _contact_sheet(picked: dict[str, list[tuple[str, bytes]]]) -> bytes:
    """One row of labelled thumbnails per ability, as PNG bytes."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    per_row = max(len(rows) for rows in picked.values())
    width, height = preview_size(len(picked), per_row)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    cell_w, cell_h = PREVIEW_THUMB + PREVIEW_PAD, PREVIEW_THUMB + PREVIEW_LABEL + PREVIEW_PAD
    for r, (name, rows) in enumerate(picked.items()):
        for c, (keyword, data) in enumerate(rows):
            x, y = PREVIEW_PAD + c * cell_w, PREVIEW_PAD + r * cell_h
            try:
                with Image.open(io.BytesIO(data)) as img:
                    thumb = ImageOps.contain(img.convert("RGB"), (PREVIEW_THUMB, PREVIEW_THUMB))
            except OSError:  # an undecodable image shows as a grey cell, not a crash
                thumb = Image.new("RGB", (PREVIEW_THUMB, PREVIEW_THUMB), "lightgrey")
            sheet.paste(
                thumb,
                (x + (PREVIEW_THUMB - thumb.width) // 2, y + (PREVIEW_THUMB - thumb.height) // 2),
            )
            label_y = y + PREVIEW_THUMB + 2
            draw.text((x, label_y), _fit(draw, font, name), fill="black", font=font)
            draw.text((x, label_y + 13), _fit(draw, font, keyword), fill="dimgray", font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def _fit(draw, font, text: str) -> str:
    """``text`` cut (with an ellipsis) to the thumbnail's width."""
    if draw.textlength(text, font=font) <= PREVIEW_THUMB:
        return text
    while text and draw.textlength(text + "...", font=font) > PREVIEW_THUMB:
        text = text[:-1]
    return text + "..."


# ------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------


def _write_bytes(store: OutputStore, rel: str, data: bytes) -> None:
    """Write OUT/<rel> whole or not at all, like the store's own writes."""
    store.write_bytes(rel, data)

"""Export a generated dataset to LLaVA's own format (JSON + image folder).

For users of LLaVA's trainer: ``OUT/data/*.parquet`` becomes

    DIR/llava.json          [{"id", "image": "images/<id>.<ext>", "conversations"}, ...]
    DIR/images/<id>.<ext>   the encoded image bytes, as stored (no re-encoding)

Image paths are relative to DIR, so LLaVA's ``--image_folder`` is DIR and
``--data_path`` is DIR/llava.json. Rows are streamed batch by batch: memory stays flat
however large the dataset.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from raypipe.errors import RaypipeError

#: Rows read from Parquet at a time.
READ_BATCH = 256


@dataclass
class ExportReport:
    """What an export wrote, and which rows it skipped (with why)."""

    json_path: Path
    image_dir: Path
    rows: int = 0
    image_bytes: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # id -> reason

    def summary(self) -> str:
        lines = [
            f"wrote {self.rows} samples to {self.json_path}",
            f"images: {self.image_dir} ({self.image_bytes / 2**20:.1f} MiB)",
        ]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} rows:")
            lines += [f"  {i}: {why}" for i, why in list(self.skipped.items())[:20]]
            if len(self.skipped) > 20:
                lines.append(f"  ... and {len(self.skipped) - 20} more")
        return "\n".join(lines)


def _image_ext(image: dict) -> str:
    """Extension from the stored path, else from the bytes' format."""
    suffix = Path(image.get("path") or "").suffix.lower().lstrip(".")
    if suffix:
        return suffix
    from PIL import Image

    fmt = (Image.open(io.BytesIO(image["bytes"])).format or "png").lower()
    return {"jpeg": "jpg"}.get(fmt, fmt)


def _open_dataset(data: str | Path):
    import pyarrow.dataset as pads

    try:
        return pads.dataset(str(data), format="parquet")
    except (FileNotFoundError, OSError, ValueError) as e:
        raise RaypipeError(
            f"cannot read Parquet from {data}: {e}. Pass the generation run's data folder "
            "(OUT/data) or its URI (s3://bucket/run/data)."
        ) from None


def export_llava(data_dir_or_uri: str | Path, out_dir: str | Path) -> ExportReport:
    """Write LLaVA's JSON and image folder for the samples in ``data_dir_or_uri``.

    Rows without image bytes or without a conversation, and repeated ids, are skipped
    and listed in the report (never dropped silently).
    """
    dataset = _open_dataset(data_dir_or_uri)
    missing = {"id", "image", "conversations"} - set(dataset.schema.names)
    if missing:
        raise RaypipeError(
            f"{data_dir_or_uri}: not a raypipe sample table (missing columns {sorted(missing)})"
        )
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    report = ExportReport(json_path=out / "llava.json", image_dir=images)
    seen: set[str] = set()

    tmp = report.json_path.with_suffix(".json.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write("[")
        for batch in dataset.to_batches(
            columns=["id", "image", "conversations"], batch_size=READ_BATCH
        ):
            for row in batch.to_pylist():
                sid = row["id"]
                image = row["image"] or {}
                if sid in seen:
                    report.skipped[f"{sid} (repeat)"] = "duplicate id"
                    continue
                if not image.get("bytes"):
                    report.skipped[sid] = "no image bytes"
                    continue
                if not row["conversations"]:
                    report.skipped[sid] = "no conversation"
                    continue
                seen.add(sid)
                name = f"{sid}.{_image_ext(image)}"
                (images / name).write_bytes(image["bytes"])
                entry = {
                    "id": sid,
                    "image": f"images/{name}",
                    "conversations": [
                        {"from": t["from"], "value": t["value"]} for t in row["conversations"]
                    ],
                }
                f.write(",\n " if report.rows else "\n ")
                f.write(json.dumps(entry, ensure_ascii=False))
                report.rows += 1
                report.image_bytes += len(image["bytes"])
        f.write("\n]\n")
    tmp.replace(report.json_path)
    return report

"""Training data: read and mix sources on Ray Data, encode samples, collate batches.

Three source formats, all normalised to one row layout (:data:`TRAIN_ROW_SCHEMA`):

- ``raypipe``: a generation run's Parquet (``OUT/data/*.parquet``, DESIGN.md section 3);
  the path may be OUT, OUT/data or one file.
- ``llava_json``: LLaVA's ``[{"id", "image", "conversations"}]`` JSON (or JSON lines) with
  image paths relative to an image folder (default: the JSON's folder).
- ``stablellava``: StableLLaVA release rows ``{"id", "image", "prompt", "question",
  "answer"}``, turned into one human/gpt exchange.

Flow::

    check_sources(sources)                    # ConfigError before any worker starts
    ds = build_train_dataset(sources, seed=0) # rows {id, source, image, image_error, conversations}
    ds_ok, drops = encode_dataset(ds, model_dir, "vicuna_v1", 2048, pad_to_square=True)
    ...                                       # iterate ds_ok, collate(batch, pad_token_id)
    summarize_drops(drops)                    # {"rows": n, "kept": k, "dropped": {reason: n}}

Rows that cannot be trained on (undecodable image, missing file, no ``<image>`` in the
first human turn, nothing left to supervise after truncation, ...) are flagged with a
``drop_reason`` by :class:`SampleEncoder` and counted, never a crash and never silent.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from raypipe import storage
from raypipe.errors import ConfigError, ModelError
from raypipe.schema import TURN_TYPE
from raypipe.train.conversation import (
    IGNORE_INDEX,
    ConversationRenderer,
    Dropped,
    normalize_image_placeholder,
)

logger = logging.getLogger(__name__)

SOURCE_KINDS = ("raypipe", "llava_json", "stablellava")

#: Rows that build_train_dataset yields. ``image`` holds encoded bytes, or is null with
#: ``image_error`` saying why: "<reason>[: <detail>]" with reason DROP_MISSING_FILE or
#: DROP_NO_IMAGE.
TRAIN_ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("image", pa.binary()),
        ("image_error", pa.string()),
        ("conversations", pa.list_(TURN_TYPE)),
    ]
)

# Reasons for rows dropped by the data side (the conversation side adds its own DROP_*).
DROP_MISSING_FILE = "missing image file"
DROP_NO_IMAGE = "row has no image"
DROP_UNDECODABLE = "undecodable image"

# While staged, rows also carry an image path to read after mixing, and their sort key.
_STAGED_SCHEMA = pa.schema(
    list(TRAIN_ROW_SCHEMA) + [("image_path", pa.string()), ("order_key", pa.int64())]
)
_PARQUET_COLUMNS = ["id", "image", "conversations"]
_JSON_BLOCK_ROWS = 4096
_SORT_ROWS = 512  # rows per partition of the global shuffle (they carry image bytes)
_SORT_MAX_PARTITIONS = 1000


# ---------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------


@dataclass
class DataSource:
    """One training data source."""

    #: A raypipe run dir, Parquet dir or file; or a LLaVA / StableLLaVA JSON file.
    path: str
    #: "raypipe", "llava_json" or "stablellava"; None = detect from the path and contents.
    kind: str | None = None
    #: Folder that JSON image paths are relative to; None = the JSON file's folder.
    image_folder: str | None = None
    #: How many times each row is used, in expectation: 1 = once, 0.3 = a random 30%,
    #: 2 = twice. Sets the mixing ratio between sources.
    weight: float = 1.0
    #: Set by :func:`check_sources`: kind and paths are resolved and checked.
    checked: bool = False


_WEIGHT = re.compile(r"^(?P<rest>.*)@(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")
#: The ":" between a source and its image folder: not a URI's "://", not a port (":9000").
_FOLDER_SEP = re.compile(r":(?!//)(?!\d+(?:[/&?]|$))")


def parse_source(spec: str) -> DataSource:
    """``PATH[:IMAGE_FOLDER][@WEIGHT]`` -> DataSource.

    Examples: ``out/demo/data``, ``llava.json:images_dir``, ``x.json:imgs@0.3``,
    ``out/demo@2``, ``s3://bucket/run/data``, ``s3://b/llava.json:s3://b/images``. Paths
    may be URIs of any pyarrow filesystem, with query options
    (``?endpoint_override=host:9000``). The kind is detected later (:func:`check_sources`).
    """
    spec = spec.strip()
    if not spec:
        raise ConfigError("empty data source; give --data PATH[:IMAGE_FOLDER][@WEIGHT]")
    weight = 1.0
    m = _WEIGHT.match(spec)
    if m:
        spec, weight = m.group("rest"), float(m.group("weight"))
    scheme, sep_uri, rest = spec.partition("://") if "://" in spec else ("", "", spec)
    found = _FOLDER_SEP.search(rest)
    path, folder = (rest[: found.start()], rest[found.end() :]) if found else (rest, None)
    return DataSource(path=f"{scheme}{sep_uri}{path}", image_folder=folder, weight=weight)


def check_sources(sources: list[DataSource | str]) -> list[DataSource]:
    """Validate sources before any worker starts; return them with kind and paths resolved.

    Raises ConfigError for: no sources, a missing path or image folder, an unknown format,
    an empty dataset, a bad weight.
    """
    if not sources:
        raise ConfigError(
            "no training data: give --data PATH (a raypipe run's OUT/data, a LLaVA JSON "
            "with :IMAGE_FOLDER, or a StableLLaVA JSON), or set data.sources in the config"
        )
    return [
        s
        if isinstance(s, DataSource) and s.checked
        else _resolve(parse_source(s) if isinstance(s, str) else s)
        for s in sources
    ]


def _open(location: str, what: str):
    """``(fs, path, FileInfo)`` of a source location; ConfigError if it cannot be opened."""
    try:
        fs, path = storage.open_location(location)
        return fs, path, fs.get_file_info(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {location!r} cannot be opened: {exc}") from None


def _resolve(src: DataSource) -> DataSource:
    fs, path, info = _open(src.path, "data source")
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(
            f"data source {src.path!r} does not exist; give a raypipe run directory (or its "
            "data/ folder), a LLaVA JSON or a StableLLaVA JSON"
        )
    if not (math.isfinite(src.weight) and src.weight > 0):
        raise ConfigError(f"data source {src.path!r}: weight must be > 0, got {src.weight}")
    if src.kind is not None and src.kind not in SOURCE_KINDS:
        raise ConfigError(f"data source {src.path!r}: kind {src.kind!r} not in {SOURCE_KINDS}")
    location = src.path if storage.is_uri(src.path) else path
    if info.type == pafs.FileType.Directory or path.endswith(".parquet"):
        if src.kind not in (None, "raypipe"):
            raise ConfigError(f"data source {src.path!r} is Parquet, not {src.kind!r}")
        fs, files = parquet_files(location)
        rows = _check_parquet(src.path, fs, files)
        if rows == 0:
            raise ConfigError(
                f"data source {src.path!r} has no rows: the generation run accepted no "
                "samples (see its rejects/ and manifest.json) or the files are empty"
            )
        return replace(src, path=location, kind="raypipe", checked=True)
    if not path.endswith((".json", ".jsonl")):
        raise ConfigError(
            f"data source {src.path!r}: unknown format (expected a directory or .parquet "
            "file of raypipe samples, or a .json/.jsonl LLaVA or StableLLaVA file)"
        )
    first = _peek_json(fs, path, src.path)
    if first is None:
        raise ConfigError(f"data source {src.path!r} is an empty list: nothing to train on")
    kind = src.kind or _json_kind(src.path, first)
    folder = src.image_folder or storage.parent(location)
    _, folder_path, folder_info = _open(folder, "image folder")
    if folder_info.type != pafs.FileType.Directory:
        raise ConfigError(
            f"image folder {folder!r} of data source {src.path!r} does not exist; "
            "write the source as JSON:IMAGE_FOLDER"
        )
    folder = folder if storage.is_uri(folder) else folder_path
    return replace(src, path=location, kind=kind, image_folder=folder, checked=True)


def parquet_files(location: str) -> tuple[pafs.FileSystem, list[str]]:
    """``(fs, Parquet files)`` of a raypipe source: OUT, OUT/data or one file.

    Hidden files (``.tmp-*`` left by a killed writer, ``_SUCCESS``) are skipped.
    """
    fs, path = storage.open_location(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        return fs, [path]
    data = f"{path.rstrip('/')}/data"
    if fs.get_file_info(data).type == pafs.FileType.Directory and not storage.list_files(
        fs, path, ".parquet", recursive=False
    ):
        path = data  # a generation run's OUT directory
    files = storage.list_files(fs, path, ".parquet")
    if not files:
        raise ConfigError(
            f"no .parquet files under {location!r}; give a raypipe run directory "
            "(OUT or OUT/data) or a JSON source"
        )
    return fs, files


def _check_parquet(name: str, fs: pafs.FileSystem, files: list[str]) -> int:
    import pyarrow.parquet as pq

    schema = pq.read_schema(files[0], filesystem=fs)
    missing = [c for c in _PARQUET_COLUMNS if c not in schema.names]
    if missing:
        raise ConfigError(
            f"data source {name!r} lacks columns {missing}: not raypipe samples "
            f"(DESIGN.md section 3); columns found: {schema.names}"
        )
    return sum(pq.read_metadata(f, filesystem=fs).num_rows for f in files)


def _peek_json(fs: pafs.FileSystem, path: str, name: str) -> dict | None:
    """The first record of a JSON list or JSON-lines file (None if empty) without a full parse."""
    decoder = json.JSONDecoder()
    size = 1 << 16
    while True:
        with fs.open_input_stream(path) as f:
            head = f.read(size).decode("utf-8", errors="replace")
            complete = len(head) < size
        text = head.lstrip()
        if path.endswith(".jsonl"):
            line = next((ln for ln in text.splitlines() if ln.strip()), "")
            if not line:
                return None
            try:
                return json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{name!r}: first line is not JSON ({exc})") from exc
        if not text.startswith("["):
            raise ConfigError(f"{name!r}: expected a JSON list of records")
        body = text[1:].lstrip()
        if body.startswith("]"):
            return None
        try:
            record, _ = decoder.raw_decode(body)
            return record
        except json.JSONDecodeError as exc:
            if complete:
                raise ConfigError(f"{name!r} is not valid JSON ({exc})") from exc
            size *= 4  # the first record is longer than what was read


def _json_kind(name: str, record: Any) -> str:
    if isinstance(record, dict) and "conversations" in record:
        return "llava_json"
    if isinstance(record, dict) and {"question", "answer"} <= record.keys():
        return "stablellava"
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ConfigError(
        f"data source {name!r}: unknown record format {keys}; expected LLaVA "
        '{"id", "image", "conversations"} or StableLLaVA {"id", "image", "question", "answer"}'
    )


# ---------------------------------------------------------------------------------------
# Reading and mixing
# ---------------------------------------------------------------------------------------


def build_train_dataset(
    sources: list[DataSource | str],
    *,
    seed: int,
    num_samples: int | None = None,
    shuffle: bool = True,
    epoch: int = 0,
):
    """Read, weight and mix ``sources`` into one Ray Dataset of :data:`TRAIN_ROW_SCHEMA` rows.

    Each row is kept ``weight`` times in expectation (decided by a hash of seed, source and
    row, so the selection is the same on every run and worker count). With ``shuffle`` the
    rows are globally ordered by a second hash that also takes ``epoch``: the order is a
    pure function of (seed, epoch, data), whatever the block layout. Without it, sources
    follow each other in the given order. ``num_samples`` keeps the first that many rows.
    Image files of JSON sources are read after mixing, so only the kept rows are read.
    """
    # 1. Validate and resolve.
    resolved = check_sources(sources)
    # 2. Stage each source: rows repeated / sampled by weight, each with its sort key.
    #    JSON sources are staged in this process (their records are small); Parquet
    #    sources, which carry the image bytes, are staged on Ray Data.
    staged: list[Any] = []  # per source: a Ray Dataset or a list of rows
    for i, src in enumerate(resolved):
        if src.kind == "raypipe":
            staged.append(_stage_parquet_source(src, i, seed, epoch))
        else:
            staged.append(_stage_json_source(src, i, seed, epoch))
    # 3. Global, deterministic order. Rows all in this process are sorted here; otherwise
    #    Ray Data sorts (a distributed shuffle).
    in_process = all(isinstance(part, list) for part in staged)
    if in_process:
        rows = [row for part in staged for row in part]
        if shuffle:
            rows.sort(key=lambda r: r["order_key"])
        ds = _rows_dataset(rows)
    else:
        parts = [_rows_dataset(p) if isinstance(p, list) else p for p in staged]
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        if shuffle:
            rows = sum(
                len(p) if isinstance(p, list) else _parquet_rows(src) * src.weight
                for p, src in zip(staged, resolved)
            )
            ds = ds.sort("order_key", boundaries=_sort_boundaries(rows))
    if num_samples is not None:
        ds = ds.limit(num_samples)
    # 4. Read image files of the kept rows; drop staging columns.
    return ds.map_batches(_read_image_files, batch_format="pyarrow", batch_size=64)


def _sort_boundaries(rows: float) -> list[int]:
    """Even split points of the (uniform) order keys: about _SORT_ROWS rows per partition.

    Given, they spare Ray Data the sampling pass and its default of 200 partitions,
    which dominates small runs.
    """
    parts = int(min(_SORT_MAX_PARTITIONS, max(2, math.ceil(rows / _SORT_ROWS))))
    return [(2**63 // parts) * i for i in range(1, parts)]


def _parquet_rows(src: DataSource) -> int:
    import pyarrow.parquet as pq

    fs, files = parquet_files(src.path)
    return sum(pq.read_metadata(f, filesystem=fs).num_rows for f in files)


def _rows_dataset(rows: list[dict[str, Any]]):
    import ray

    table = pa.Table.from_pylist(rows, schema=_STAGED_SCHEMA)
    # Several blocks, so image reading and encoding run in parallel.
    step = max(1, min(_JSON_BLOCK_ROWS, -(-table.num_rows // 8)))
    return ray.data.from_arrow(
        [table.slice(i, step) for i in range(0, max(table.num_rows, 1), step)]
    )


def _stage_parquet_source(src: DataSource, index: int, seed: int, epoch: int):
    import ray

    fs, files = parquet_files(src.path)
    ds = ray.data.read_parquet(files, filesystem=fs).select_columns(_PARQUET_COLUMNS)
    return ds.map_batches(
        _stage_parquet_batch,
        fn_kwargs={
            "source": src.path,
            "index": index,
            "weight": src.weight,
            "seed": seed,
            "epoch": epoch,
        },
        batch_format="pyarrow",
        batch_size=64,
    )


def _stage_json_source(src: DataSource, index: int, seed: int, epoch: int) -> list[dict]:
    records = load_json(src.path)
    to_turns = _stablellava_turns if src.kind == "stablellava" else _llava_turns
    rows = []
    for position, record in enumerate(records):
        if not isinstance(record, dict):
            record = {"id": f"#{position}", "conversations": []}
        row_id = str(record.get("id", f"#{position}"))
        image = record.get("image")
        error = None
        if not image:
            error = DROP_NO_IMAGE
        elif not isinstance(image, str):  # e.g. a list: one image per sample only
            error, image = f"{DROP_NO_IMAGE}: image field is a {type(image).__name__}", None
        base = {
            "id": row_id,
            "source": src.path,
            "image": None,
            "image_error": error,
            "image_path": storage.join(src.image_folder, image) if image else None,
            "conversations": to_turns(record),
        }
        for copy in _copies(src.weight, seed, index, f"{position}"):
            rows.append({**base, "order_key": _order_key(seed, epoch, index, f"{position}", copy)})
    if not rows:
        logger.warning("data source %s: weight %s kept no rows", src.path, src.weight)
    return rows


def load_json(location: str) -> list[Any]:
    """The records of a JSON list or JSON-lines file (local path or URI)."""
    fs, path = storage.open_location(location)
    try:
        text = storage.read_bytes(fs, path).decode("utf-8")
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{location!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise ConfigError(f"{location!r}: expected a JSON list of records")
    return data


def _llava_turns(record: dict) -> list[dict[str, str]]:
    turns = record.get("conversations") or []
    return [
        {"from": str(t.get("from", "")), "value": str(t.get("value", ""))}
        for t in turns
        if isinstance(t, dict)
    ]


def _stablellava_turns(record: dict) -> list[dict[str, str]]:
    question, answer = record.get("question"), record.get("answer")
    if not question or not answer:
        return []
    question = str(question)
    if "<image>" not in question:
        question = f"<image>\n{question}"
    return [{"from": "human", "value": question}, {"from": "gpt", "value": str(answer)}]


def _stage_parquet_batch(
    batch: pa.Table, source: str, index: int, weight: float, seed: int, epoch: int
) -> pa.Table:
    rows = []
    for row in batch.to_pylist():
        image = row.get("image") or {}
        data, path = image.get("bytes"), image.get("path")
        error = None if data or path else DROP_NO_IMAGE
        staged = {
            "id": row["id"],
            "source": source,
            "image": data,
            "image_error": error,
            "image_path": None if data else path,
            "conversations": [
                {"from": t["from"], "value": t["value"]} for t in row["conversations"] or []
            ],
        }
        for copy in _copies(weight, seed, index, row["id"]):
            rows.append({**staged, "order_key": _order_key(seed, epoch, index, row["id"], copy)})
    return pa.Table.from_pylist(rows, schema=_STAGED_SCHEMA)


def read_image_file(location: str) -> tuple[bytes | None, str | None]:
    """``(bytes, None)`` of an image file (local path or URI), or ``(None, image_error)``."""
    try:
        fs, path = storage.open_location(location)
        return storage.read_bytes(fs, path), None
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:120]
        return None, f"{DROP_MISSING_FILE}: {location} ({why})"


def _read_image_files(batch: pa.Table) -> pa.Table:
    rows = batch.to_pylist()
    for row in rows:
        if row["image"] is None and row["image_path"] and not row["image_error"]:
            row["image"], row["image_error"] = read_image_file(row["image_path"])
    return pa.Table.from_pylist(rows, schema=_STAGED_SCHEMA).select(TRAIN_ROW_SCHEMA.names)


def _hash01(*parts: Any) -> int:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _copies(weight: float, seed: int, index: int, row_key: str) -> range:
    """How many copies of a row to keep: floor(weight), plus one with P = frac(weight)."""
    whole = math.floor(weight)
    frac = weight - whole
    extra = frac > 0 and _hash01("keep", seed, index, row_key) / 2.0**64 < frac
    return range(whole + int(extra))


def _order_key(seed: int, epoch: int, index: int, row_key: str, copy: int) -> int:
    return _hash01("order", seed, epoch, index, row_key, copy) >> 1  # fits in int64


# ---------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------


def load_processor(model_dir: str):
    """The model's ``LlavaProcessor`` (``raypipe-tiny/...`` ids resolve to tiny models)."""
    from transformers import AutoProcessor

    from raypipe.testing import resolve_tiny

    try:
        processor = AutoProcessor.from_pretrained(resolve_tiny(model_dir))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a processor from {model_dir!r}: {exc}") from exc
    for attr in ("image_processor", "tokenizer", "patch_size", "image_token"):
        if getattr(processor, attr, None) is None:
            raise ModelError(
                f"the processor of {model_dir!r} has no {attr}; LLaVA training needs a "
                "LlavaProcessor saved with image_processor, tokenizer and patch_size"
            )
    return processor


def image_token_count(processor, height: int, width: int) -> int:
    """Image tokens for pixel values of ``height`` x ``width`` (LlavaProcessor's formula)."""
    patch = processor.patch_size
    count = (height // patch) * (width // patch) + (processor.num_additional_image_tokens or 0)
    if processor.vision_feature_select_strategy == "default":
        count -= 1
    return count


def expand_to_square(image, background: tuple[int, int, int]):
    """Pad a PIL image to a square, centred, as LLaVA-1.5 does (``expand2square``)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


class SampleEncoder:
    """Ray Data stage: normalised rows -> ``input_ids``, ``labels``, ``pixel_values``.

    Input columns: ``id``, ``source``, ``image`` (bytes or null), ``image_error``,
    ``conversations`` (:data:`TRAIN_ROW_SCHEMA`). Output columns: ``id``, ``source``,
    ``input_ids`` (int32, variable length), ``labels`` (int32, same length),
    ``pixel_values`` (float32 [3, H, W]), ``drop_reason`` ("" when kept, else why the row
    cannot be trained on) and ``drop_detail``. Dropped rows keep zero-length ids and zero
    pixels; :func:`encode_dataset` counts and removes them.

    Args:
        model_dir: directory or id of a model with a saved LlavaProcessor.
        template: "vicuna_v1" or "chat_template" (see raypipe.train.conversation).
        max_length: token limit per sample (text is cut, image tokens never).
        pad_to_square: pad images to a square with the processor's mean colour first.
        processor: use this processor instead of loading one from ``model_dir``.
        system: system prompt override (see ConversationRenderer).
    """

    def __init__(
        self,
        model_dir: str | None = None,
        template: str = "vicuna_v1",
        max_length: int = 2048,
        pad_to_square: bool = True,
        *,
        processor: Any = None,
        system: str | None = None,
    ):
        if processor is None:
            if model_dir is None:
                raise ConfigError("SampleEncoder needs a model_dir or a processor")
            processor = load_processor(model_dir)
        self.processor = processor
        self.max_length = max_length
        self.pad_to_square = pad_to_square
        tokenizer = processor.tokenizer
        self.renderer = ConversationRenderer(
            tokenizer,
            template,
            image_token=processor.image_token,
            system=system,
            chat_template=getattr(tokenizer, "chat_template", None)
            or getattr(processor, "chat_template", None),
        )
        mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        self.background = tuple(int(x * 255) for x in mean)
        # Every image comes out at the processor's crop size: learn it once.
        from PIL import Image

        probe = self._pixels([Image.new("RGB", (8, 8))])
        self.pixel_shape = probe.shape[1:]
        self.num_image_tokens = image_token_count(processor, *self.pixel_shape[-2:])

    def __call__(self, batch: dict[str, Any] | pa.Table) -> dict[str, np.ndarray]:
        rows = _batch_rows(batch)
        out = [self.encode_text(row) for row in rows]
        images, where = [], []
        for i, (row, enc) in enumerate(zip(rows, out)):
            if enc["drop_reason"]:
                continue
            image = self._decode(row)
            if isinstance(image, Dropped):
                out[i] = _dropped_row(image)
            else:
                images.append(image)
                where.append(i)
        pixels = np.zeros((len(rows), *self.pixel_shape), dtype=np.float32)
        if images:
            pixels[where] = self._pixels(images)
        return {
            "id": np.array([r.get("id") for r in rows], dtype=object),
            "source": np.array([r.get("source") for r in rows], dtype=object),
            "input_ids": _object_array([e["input_ids"] for e in out]),
            "labels": _object_array([e["labels"] for e in out]),
            "pixel_values": pixels,
            "drop_reason": np.array([e["drop_reason"] for e in out], dtype=object),
            "drop_detail": np.array([e["drop_detail"] for e in out], dtype=object),
        }

    def encode_text(self, row: dict[str, Any]) -> dict[str, Any]:
        """Token ids and labels of one row (or its drop reason); no image decoding."""
        if row.get("image_error"):
            reason, _, detail = str(row["image_error"]).partition(": ")
            return _dropped_row(Dropped(reason, detail))
        turns = normalize_image_placeholder(
            list(row.get("conversations") or []), self.processor.image_token
        )
        if isinstance(turns, Dropped):
            return _dropped_row(turns)
        rendered = self.renderer.render(turns, self.num_image_tokens, self.max_length)
        if isinstance(rendered, Dropped):
            return _dropped_row(rendered)
        return {
            "input_ids": np.asarray(rendered.input_ids, dtype=np.int32),
            "labels": np.asarray(rendered.labels, dtype=np.int32),
            "drop_reason": "",
            "drop_detail": "",
        }

    def _decode(self, row: dict[str, Any]):
        from PIL import Image

        data = row.get("image")
        if not data:
            return Dropped(DROP_NO_IMAGE)
        try:
            with Image.open(io.BytesIO(data)) as img:
                image = img.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            return Dropped(DROP_UNDECODABLE, f"{type(exc).__name__}: {exc}"[:200])
        if self.pad_to_square:
            image = expand_to_square(image, self.background)
        return image

    def _pixels(self, images: list) -> np.ndarray:
        out = self.processor.image_processor(images=images, return_tensors="np")
        return np.asarray(out["pixel_values"], dtype=np.float32)


def _batch_rows(batch: dict[str, Any] | pa.Table | list[dict]) -> list[dict[str, Any]]:
    if isinstance(batch, list):
        return batch
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    columns = list(batch)
    n = len(batch[columns[0]]) if columns else 0
    rows = []
    for i in range(n):
        row = {c: batch[c][i] for c in columns}
        conv = row.get("conversations")
        if conv is not None and not isinstance(conv, list):
            row["conversations"] = list(conv)  # numpy batches hold turns in object arrays
        rows.append(row)
    return rows


def _dropped_row(dropped: Dropped) -> dict[str, Any]:
    return {
        "input_ids": np.zeros(0, dtype=np.int32),
        "labels": np.zeros(0, dtype=np.int32),
        "drop_reason": dropped.reason,
        "drop_detail": dropped.detail,
    }


def _object_array(items: list[np.ndarray]) -> np.ndarray:
    # Element-wise, so equal-length arrays do not collapse into a 2-D array.
    arr = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        arr[i] = item
    return arr


# ---------------------------------------------------------------------------------------
# Drop accounting
# ---------------------------------------------------------------------------------------


def summarize_drops(source: Any) -> dict[str, Any]:
    """Counts of dropped rows by reason.

    ``source`` is a :class:`DropCounter` (-> its full summary: rows, kept, dropped by
    reason, a few example ids per reason), or an encoded batch / list of encoded rows
    (-> ``{"rows": n, "kept": k, "dropped": {reason: n}}``).
    """
    if isinstance(source, DropCounter):
        return source.summary()
    rows = _batch_rows(source)
    reasons = Counter(str(r.get("drop_reason") or "") for r in rows)
    kept = reasons.pop("", 0)
    return {"rows": len(rows), "kept": kept, "dropped": dict(sorted(reasons.items()))}


class _DropTally:
    """Ray actor behind DropCounter: adds up what the encoding stage reports."""

    def __init__(self, max_examples: int):
        self.max_examples = max_examples
        self.rows = 0
        self.dropped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, rows: int, drops: list[tuple[str, str, str]]) -> None:
        self.rows += rows
        for reason, row_id, detail in drops:
            self.dropped[reason] += 1
            examples = self.examples.setdefault(reason, [])
            if len(examples) < self.max_examples:
                examples.append(f"{row_id}: {detail}" if detail else str(row_id))

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "kept": self.rows - sum(self.dropped.values()),
            "dropped": dict(sorted(self.dropped.items())),
            "examples": {k: self.examples[k] for k in sorted(self.examples)},
        }


class DropCounter:
    """Counts the rows that encode_dataset drops, as the dataset streams (a small Ray actor).

    Counts add up over every pass over the dataset (each epoch re-encodes).
    """

    def __init__(self, max_examples: int = 5):
        import ray

        self.actor = ray.remote(num_cpus=0)(_DropTally).remote(max_examples)

    def summary(self) -> dict[str, Any]:
        import ray

        return ray.get(self.actor.summary.remote())


class _CountingEncoder(SampleEncoder):
    """encode_dataset's stage: SampleEncoder, then report drops to the counter and keep
    the trainable rows (one actor stage, not two)."""

    def __init__(self, counter, **encoder_kwargs):
        super().__init__(**encoder_kwargs)
        self.counter = counter

    def __call__(self, batch):
        import ray

        out = super().__call__(batch)
        reasons = out["drop_reason"]
        bad = [i for i, r in enumerate(reasons) if r]
        drops = [(str(reasons[i]), str(out["id"][i]), str(out["drop_detail"][i])) for i in bad]
        ray.get(self.counter.add.remote(len(reasons), drops))
        keep = np.array([not r for r in reasons], dtype=bool)
        return {k: v[keep] for k, v in out.items() if k not in ("drop_reason", "drop_detail")}


def encode_dataset(
    ds,
    model_dir: str | None,
    template: str = "vicuna_v1",
    max_length: int = 2048,
    pad_to_square: bool = True,
    *,
    processor: Any = None,
    batch_size: int = 16,
    num_actors: int = 1,
    num_cpus: float = 0.5,
    counter: DropCounter | None = None,
):
    """Encode a build_train_dataset stream; return ``(ds_ok, counter)``.

    ``ds_ok`` holds only trainable rows (``id``, ``source``, ``input_ids``, ``labels``,
    ``pixel_values``); ``counter`` (a :class:`DropCounter`) counts the others by reason as
    the stream runs: read it with :func:`summarize_drops` after iterating. The encoders
    are an actor pool of ``num_actors`` actors of ``num_cpus`` CPUs each (fractional by
    default, so Ray Train workers and the read leave room on small machines).
    ``processor`` (e.g. one composed from a vision tower and an LLM) replaces loading one
    from ``model_dir``; it is shipped to the actors.
    """
    import ray

    counter = counter or DropCounter()
    ds_ok = ds.map_batches(
        _CountingEncoder,
        fn_constructor_kwargs={
            "counter": counter.actor,
            "model_dir": model_dir,
            "template": template,
            "max_length": max_length,
            "pad_to_square": pad_to_square,
            "processor": processor,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors),
        num_cpus=num_cpus,
    )
    return ds_ok, counter


# ---------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------


def collate(
    rows: list[dict[str, Any]] | dict[str, Any],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """Encoded rows -> tensors: ``input_ids`` and ``attention_mask`` [B, T] (right-padded
    with ``pad_token_id`` / 0), ``labels`` [B, T] (padded with -100), ``pixel_values``
    [B, 3, H, W] float32. Rows must be kept rows (encode_dataset removes the others)."""
    import torch

    if isinstance(rows, dict):
        if "drop_reason" in rows and any(r for r in rows["drop_reason"]):
            raise ValueError("collate got dropped rows; filter rows with a drop_reason first")
        ids = [np.asarray(x) for x in rows["input_ids"]]
        labels = [np.asarray(x) for x in rows["labels"]]
        pixels = np.stack([np.asarray(p, dtype=np.float32) for p in rows["pixel_values"]])
    else:
        if any(r.get("drop_reason") for r in rows):
            raise ValueError("collate got dropped rows; filter rows with a drop_reason first")
        ids = [np.asarray(r["input_ids"]) for r in rows]
        labels = [np.asarray(r["labels"]) for r in rows]
        pixels = np.stack([np.asarray(r["pixel_values"], dtype=np.float32) for r in rows])
    if not ids:
        raise ValueError("collate got an empty batch")
    width = max(len(x) for x in ids)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    batch_labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        if len(x) != len(y):
            raise ValueError(f"row {i}: {len(x)} input ids but {len(y)} labels")
        batch_ids[i, : len(x)] = torch.from_numpy(x.astype(np.int64))
        batch_labels[i, : len(y)] = torch.from_numpy(y.astype(np.int64))
        mask[i, : len(x)] = 1
    return {
        "input_ids": batch_ids,
        "attention_mask": mask,
        "labels": batch_labels,
        "pixel_values": torch.from_numpy(pixels),
    }

"""Training data sources: what ``--data`` names, checked before any worker starts.

Three formats:

- ``raypipe``: a generation run's Parquet (``OUT/data/*.parquet``; docs/data-contract.md); the path may be OUT, OUT/data or one file.
- ``llava_json``: LLaVA's ``[{"id", "image", "conversations"}]`` JSON (or JSON lines) with
  image paths relative to an image folder (default: the JSON's folder).
- ``stablellava``: StableLLaVA release rows ``{"id", "image", "prompt", "question",
  "answer"}``, turned into one human/gpt exchange.

Paths may be local or URIs of any pyarrow filesystem (``s3://bucket/run/data``), with
query options. Files whose names start with ``.`` or ``_`` (a killed writer's
``.tmp-*`` parts, ``_SUCCESS``) are never read.

**Image paths stay in their dataset.** An image path a dataset holds (a LLaVA JSON's
``image``, a Parquet row's ``image.path`` when its ``bytes`` are empty) is relative to the
source's image folder (JSON: ``:IMAGE_FOLDER`` or the JSON's folder; Parquet: the folder
holding the Parquet files, or ``:IMAGE_FOLDER``) and must stay inside it
(:func:`image_location`). ``..`` out of it, absolute paths and URIs (``s3://``,
``file://``, ...) are dropped with one reason, :data:`DROP_OUTSIDE`, whose text is the
same whether the target exists or not, and nothing is read from them. Datasets exported
with absolute paths need ``data.allow_external_paths: true``: then the dataset decides
what every worker reads, with the workers' credentials. Symbolic links inside the
folder are followed. Weights (``PATH@WEIGHT``) and the order
keys of both readers (:mod:`raypipe.train.shards`, :mod:`raypipe.train.reading`) are
seeded hashes of the row, defined here once.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any

import pyarrow.fs as pafs

from raypipe import storage
from raypipe.errors import ConfigError

SOURCE_KINDS = ("raypipe", "llava_json", "stablellava")

# Reasons for rows dropped by the data side (the conversation side adds its own DROP_*).
DROP_MISSING_FILE = "missing image file"

DROP_NO_IMAGE = "row has no image"

DROP_UNDECODABLE = "undecodable image"

DROP_OUTSIDE = "image path outside the dataset's image folder"

_PARQUET_COLUMNS = ["id", "image", "conversations"]


@dataclass
class DataSource:
    """One training data source."""

    #: A raypipe run dir, Parquet dir or file; or a LLaVA / StableLLaVA JSON file.
    path: str
    #: "raypipe", "llava_json" or "stablellava"; None = detect from the path and contents.
    kind: str | None = None
    #: Folder that image paths are relative to and stay inside; None = the JSON file's
    #: folder, or the folder holding the Parquet files.
    image_folder: str | None = None
    #: How many times each row is used, in expectation: 1 = once, 0.3 = a random 30%,
    #: 2 = twice. Sets the mixing ratio between sources.
    weight: float = 1.0
    #: Read image paths outside ``image_folder`` too (absolute paths, URIs, ``..``).
    allow_external_paths: bool = False
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
        folder = src.image_folder or data_folder(location)
        folder = folder if storage.is_uri(folder) else storage.open_location(folder)[1]
        return replace(src, path=location, kind="raypipe", image_folder=folder, checked=True)
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


def data_folder(location: str) -> str:
    """The folder holding a raypipe source's Parquet files (OUT/data for OUT; a file's
    folder), as a location (a URI keeps its query)."""
    fs, path = storage.open_location(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        return storage.parent(location)
    data = f"{path.rstrip('/')}/data"
    if fs.get_file_info(data).type == pafs.FileType.Directory and not storage.list_files(
        fs, path, ".parquet", recursive=False
    ):
        return storage.join(location, "data")  # a generation run's OUT directory
    return location


def parquet_files(location: str) -> tuple[pafs.FileSystem, list[str]]:
    """``(fs, Parquet files)`` of a raypipe source: OUT, OUT/data or one file.

    Hidden files (``.tmp-*`` left by a killed writer, ``_SUCCESS``) are skipped.
    """
    fs, path = storage.open_location(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        return fs, [path]
    fs, path = storage.open_location(data_folder(location))
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
            f"(docs/data-contract.md); columns found: {schema.names}"
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


def read_image_file(location: str) -> tuple[bytes | None, str | None]:
    """``(bytes, None)`` of an image file (local path or URI), or ``(None, image_error)``."""
    try:
        fs, path = storage.open_location(location)
        return storage.read_bytes(fs, path), None
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:120]
        return None, f"{DROP_MISSING_FILE}: {location} ({why})"


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def image_location(folder: str, path: str, allow_external: bool = False):
    """``(location, None)`` of a dataset's image ``path`` in ``folder``, or ``(None,
    DROP_OUTSIDE)`` when it would leave the folder (see the module doc).

    Decided on the string alone, before anything is opened: the answer is the same
    whether the target exists or not.
    """
    if allow_external and (storage.is_uri(path) or path.startswith("/")):
        return path, None
    if allow_external:
        return storage.join(folder, path), None
    parts: list[str] = []
    outside = path.startswith(("/", "\\")) or bool(_SCHEME.match(path)) or "\x00" in path
    if storage.is_uri(folder) and any(c in path for c in "?#"):
        outside = True  # would change the URI's query (endpoint, credentials)
    for part in path.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                outside = True
                break
            parts.pop()
        else:
            parts.append(part)
    if outside or not parts:
        return None, DROP_OUTSIDE
    return storage.join(folder, *parts), None


def llava_turns(record: dict) -> list[dict[str, str]]:
    turns = record.get("conversations") or []
    return [
        {"from": str(t.get("from", "")), "value": str(t.get("value", ""))}
        for t in turns
        if isinstance(t, dict)
    ]


def stablellava_turns(record: dict) -> list[dict[str, str]]:
    question, answer = record.get("question"), record.get("answer")
    if not question or not answer:
        return []
    question = str(question)
    if "<image>" not in question:
        question = f"<image>\n{question}"
    return [{"from": "human", "value": question}, {"from": "gpt", "value": str(answer)}]


def copies(weight: float, seed: int, index: int, row_key: str) -> range:
    """How many copies of a row to keep: floor(weight), plus one with P = frac(weight)."""
    whole = math.floor(weight)
    frac = weight - whole
    extra = frac > 0 and hash01("keep", seed, index, row_key) / 2.0**64 < frac
    return range(whole + int(extra))


def hash01(*parts: Any) -> int:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def order_key(seed: int, epoch: int, index: int, row_key: str, copy: int) -> int:
    return hash01("order", seed, epoch, index, row_key, copy) >> 1  # fits in int64


@dataclass
class JsonRecord:
    """One record of a JSON source, normalised (what both readers need of it)."""

    position: int
    id: str
    turns: list[dict[str, str]]
    image_path: str | None  #: the image file's location (image folder + record path)
    image_error: str | None  #: why the record has no usable image


def json_records(src: DataSource) -> list[JsonRecord]:
    """The records of a checked LLaVA / StableLLaVA JSON source."""
    to_turns = stablellava_turns if src.kind == "stablellava" else llava_turns
    out = []
    for position, record in enumerate(load_json(src.path)):
        if not isinstance(record, dict):
            record = {"id": f"#{position}", "conversations": []}
        image = record.get("image")
        location, error = None, None
        if not image:
            error = DROP_NO_IMAGE
        elif not isinstance(image, str):  # e.g. a list: one image per sample only
            error = f"{DROP_NO_IMAGE}: image field is a {type(image).__name__}"
        else:
            location, error = image_location(src.image_folder, image, src.allow_external_paths)
        out.append(
            JsonRecord(
                position=position,
                id=str(record.get("id", f"#{position}")),
                turns=to_turns(record),
                image_path=location,
                image_error=error,
            )
        )
    return out


__all__ = [
    "JsonRecord",
    "json_records",
    "DROP_MISSING_FILE",
    "DROP_NO_IMAGE",
    "DROP_OUTSIDE",
    "DROP_UNDECODABLE",
    "SOURCE_KINDS",
    "DataSource",
    "check_sources",
    "copies",
    "data_folder",
    "hash01",
    "image_location",
    "llava_turns",
    "load_json",
    "order_key",
    "parquet_files",
    "parse_source",
    "read_image_file",
    "stablellava_turns",
]

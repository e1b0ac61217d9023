"""Locations on any pyarrow filesystem: local paths and URIs (``s3://``, ``gs://``, ...).

A location is a string: a local path, or a URI that ``pyarrow.fs.FileSystem.from_uri``
opens, with its query options (``s3://bucket/run?endpoint_override=host:9000``). Joining
keeps the query, so every file under a location opens with the same options.

Files whose names start with ``.`` or ``_`` are never data: a killed writer's
temporary part (``.tmp-*``), ``_SUCCESS`` markers, ``_common_metadata``.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs


def is_uri(location: str) -> bool:
    return "://" in str(location)


_BUCKET_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss")
_FILESYSTEMS: dict[tuple[str, str], pafs.FileSystem] = {}


def open_location(location: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path on it)`` of a local path or URI (a local path is made absolute).

    Filesystems are cached per scheme, bucket and query, so opening many files under one
    location (images of a JSON source) builds one client.
    """
    location = str(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    base, _, query = location.partition("?")
    scheme, _, rest = base.partition("://")
    if scheme not in _BUCKET_SCHEMES:  # hdfs://host:port/path, file://...: no cache
        return pafs.FileSystem.from_uri(location)
    key = (f"{scheme}://{rest.split('/', 1)[0]}", query)
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        fs, path = pafs.FileSystem.from_uri(location)
        _FILESYSTEMS[key] = fs
        return fs, path
    return fs, rest.rstrip("/")  # what from_uri returns for bucket stores: bucket/key


def join(location: str, *parts: str) -> str:
    """``location/part/...``, keeping a URI's query options."""
    location = str(location)
    base, sep, query = location.partition("?") if is_uri(location) else (location, "", "")
    tail = "/".join(p.strip("/") for p in parts if p)
    if not tail:
        return location
    joined = f"{base.rstrip('/')}/{tail}" if is_uri(location) else str(Path(base, tail))
    return f"{joined}{sep}{query}"


def parent(location: str) -> str:
    """The folder holding ``location`` (a URI keeps its query)."""
    location = str(location)
    if not is_uri(location):
        return str(Path(location).parent)
    base, sep, query = location.partition("?")
    scheme, _, rest = base.partition("://")
    head = rest.rstrip("/").rsplit("/", 1)[0] if "/" in rest.rstrip("/") else rest
    return f"{scheme}://{head}{sep}{query}"


def name(location: str) -> str:
    """The last path component (no query)."""
    return str(location).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def is_hidden(base_name: str) -> bool:
    """Temporary or marker files (``.tmp-*``, ``_SUCCESS``): never read as data."""
    return base_name.startswith((".", "_"))


def file_info(fs: pafs.FileSystem, path: str) -> pafs.FileInfo:
    return fs.get_file_info(path)


def list_files(fs: pafs.FileSystem, path: str, suffix: str, recursive: bool = True) -> list[str]:
    """Files under ``path`` ending in ``suffix``, sorted, hidden ones (and folders) skipped."""
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    root = path.rstrip("/") + "/"
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.base_name.endswith(suffix):
            continue
        rel = info.path[len(root) :] if info.path.startswith(root) else info.base_name
        if any(is_hidden(part) for part in rel.split("/")):
            continue
        out.append(info.path)
    return sorted(out)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def upload_dir(local_dir: str | Path, location: str) -> None:
    """Copy a local folder's files to ``location`` (a no-op when it is that folder)."""
    fs, dest = open_location(location)
    local = str(Path(local_dir).resolve())
    if isinstance(fs, pafs.LocalFileSystem) and dest == local:
        return
    fs.create_dir(dest, recursive=True)
    pafs.copy_files(
        local, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


__all__ = [
    "file_info",
    "is_hidden",
    "is_uri",
    "join",
    "list_files",
    "name",
    "open_location",
    "parent",
    "read_bytes",
    "upload_dir",
    "write_bytes",
]

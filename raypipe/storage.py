"""Locations on any pyarrow filesystem: local paths and URIs (``s3://``, ``gs://``, ...).

A location is a string: a local path, or a URI that ``pyarrow.fs.FileSystem.from_uri``
opens, with its query options (``s3://bucket/run?endpoint_override=host:9000``). Joining
keeps the query, so every file under a location opens with the same options.

Files whose names start with ``.`` or ``_`` are never data: a killed writer's
temporary part (``.tmp-*``), ``_SUCCESS`` markers, ``_common_metadata``.

Whole or nothing: :func:`publish` puts bytes under their final name complete or not at
all, on a local disk (a temporary ``.tmp-*`` name in the same folder, then a rename) and
on object stores (bytes serialized first, uploaded to a temporary name, then moved:
pyarrow's ``with open_output_stream(...)`` completes the upload even when the block
raised, which would publish half an object under the name it was opened with). Every temporary name starts with ``TMP_PREFIX``; readers
skip it, and :func:`remove_temporaries` (run by the next run that holds OUT's lease)
deletes what a killed writer left.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs

#: The one prefix of every temporary name raypipe writes (readers skip it, runs clean it).
TMP_PREFIX = ".tmp-"
#: Object stores: no folders to create (a key's prefix is its folder).
OBJECT_STORES = ("s3", "gcs", "abfs")


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


def tmp_name(base_name: str) -> str:
    """A unique temporary name for a file that will be published as ``base_name``."""
    return f"{TMP_PREFIX}{uuid.uuid4().hex}-{base_name}"


def _upload(fs: pafs.FileSystem, path: str, data) -> None:
    stream = fs.open_output_stream(path)
    try:
        stream.write(data)
    finally:
        stream.close()  # also on an error: completes the upload (pyarrow has no abort)


def publish(fs: pafs.FileSystem, path: str, data, tmp_folder: str | None = None) -> None:
    """Put ``data`` (bytes or a pyarrow Buffer, already serialized) at ``path``, whole or
    not at all, replacing what is there.

    Local disks: a temporary file and a rename. Other filesystems, object stores
    included: an upload to a temporary name, then a move (on S3 a server-side copy, which
    makes the final object appear whole). pyarrow's streams cannot abort an upload: one
    that raised half-way still completes (on close, or when garbage-collected), and it
    does so under the temporary name, which readers skip and the next run removes.
    ``tmp_folder`` (default: the file's own) keeps the temporary names of a big tree
    (the LLM cache) in one folder, so removing them lists that folder only.
    """
    folder, base = path.rsplit("/", 1)
    tmp = f"{tmp_folder or folder}/{tmp_name(base)}"
    local = fs.type_name == "local"
    if local:
        os.makedirs(folder, exist_ok=True)
    elif fs.type_name not in OBJECT_STORES:
        fs.create_dir(folder, recursive=True)
    try:
        _upload(fs, tmp, data)
        if local:
            os.replace(tmp, path)
        else:
            fs.move(tmp, path)
    except BaseException:
        try:
            if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                fs.delete_file(tmp)
        except OSError:
            pass  # left for the next run's remove_temporaries
        raise


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """``publish`` under another name (kept for callers outside generation)."""
    publish(fs, path, data)


#: Temporary names of older raypipe versions' JSON writes (``manifest.json.tmp-<uuid>``).
LEGACY_TMP_MARK = ".json.tmp-"


def remove_temporaries(fs: pafs.FileSystem, path: str, recursive: bool = False) -> int:
    """Delete every ``TMP_PREFIX`` file under ``path`` (what killed writers left; also
    older versions' ``*.json.tmp-*``); returns how many. Only the run holding OUT's lease
    may call it: another live run's temporary files look the same."""
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
    removed = 0
    for info in fs.get_file_info(selector):
        name = info.base_name
        if info.type == pafs.FileType.File and (
            name.startswith(TMP_PREFIX) or LEGACY_TMP_MARK in name
        ):
            try:
                fs.delete_file(info.path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


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
    "publish",
    "read_bytes",
    "remove_temporaries",
    "tmp_name",
    "upload_dir",
    "write_bytes",
]

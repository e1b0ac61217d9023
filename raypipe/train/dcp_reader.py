"""Reading torch.distributed.checkpoint (DCP) folders without running code from them.

DCP's own ``FileSystemReader`` reads ``.metadata`` with ``pickle.load`` and its default
load planner reads non-tensor items (the optimiser's ``param_groups``) with
``torch.load(weights_only=False)``: both run whatever code a crafted file names. Here:

- ``.metadata`` is read by :class:`MetadataUnpickler`, a ``pickle.Unpickler`` whose
  ``find_class`` resolves exactly the classes DCP metadata is made of (its dataclasses,
  ``torch.Size``, dtypes, layouts, paths) and refuses anything else with
  :class:`UnsafeCheckpointError`, before any object is built;
- byte items load with ``torch.load(weights_only=True)`` (:class:`SafeLoadPlanner`);
- tensors already load with ``weights_only=True`` in DCP.

What this does not protect: anyone who can write to the checkpoint folder can still
replace the *weights* or the loop state with other (safe) values, and so change what the
model computes. Keep OUT writable by the run only.

``torch.load(weights_only=True)`` cannot read ``.metadata`` itself (it is a plain pickle,
not a torch archive), hence the restricted unpickler.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from raypipe.errors import RaypipeError


class UnsafeCheckpointError(RaypipeError, pickle.UnpicklingError):
    """A checkpoint file names code that a checkpoint never holds: it is not loaded."""


#: The classes DCP metadata pickles are made of (torch 2.11 to 2.13), by module.
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP ``.metadata`` and nothing else (see the module doc)."""

    def __init__(self, file, where: str = ".metadata"):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)  # dtypes pickle as torch.<name>
        raise UnsafeCheckpointError(
            f"{self.where} names {module}.{name}, which checkpoint metadata never holds: "
            "refusing to load it (someone may have written to the checkpoint folder). "
            "Delete that checkpoint folder to resume from the one before, and check who "
            "can write to OUT."
        )


def read_metadata(data: bytes, where: str = ".metadata"):
    """DCP ``Metadata`` from the bytes of a ``.metadata`` file; UnsafeCheckpointError if it
    names anything else."""
    from torch.distributed.checkpoint.metadata import Metadata

    metadata = MetadataUnpickler(io.BytesIO(data), where).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{where} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` goes through :class:`MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        get_path = getattr(self, "_get_metadata_path", None)
        path = get_path(rank) if get_path else self.fs.concat_path(self.path, ".metadata")
        with self.fs.create_stream(path, "rb") as f:
            metadata = read_metadata(f.read(), str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that loads byte items with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def storage_sizes(metadata) -> dict[str, int]:
    """Per storage file its metadata names (relative path), the bytes it must hold."""
    sizes: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), end)
    return sizes


def _blocked(message: str) -> str:
    """The global torch's weights-only loader names in its refusal."""
    for line in message.splitlines():
        if "GLOBAL" in line:
            return line.strip()
    return "a class weights_only loading does not allow"


def safe_load(state_dict: dict, path: str) -> None:
    """``dcp.load`` of ``state_dict`` from the local folder ``path``, loading no code."""
    import torch.distributed.checkpoint as dcp

    # Checked here first as well: inside dcp.load the error would reach the caller
    # wrapped in a CheckpointException.
    with open(f"{path}/.metadata", "rb") as f:
        read_metadata(f.read(), f"{path}/.metadata")
    try:
        dcp.load(state_dict, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
    except CheckpointException as exc:  # a BaseException: unwrap what the loader refused
        for failure, _ in exc.failures.values():
            if isinstance(failure, pickle.UnpicklingError):
                raise UnsafeCheckpointError(
                    f"{path}: an item of the checkpoint is not plain data, refusing to load "
                    f"it ({str(failure).splitlines()[-1] if str(failure) else failure!r}; "
                    f"{_blocked(str(failure))}). Delete that checkpoint folder to resume "
                    "from the one before, and check who can write to OUT."
                ) from None
        raise


__all__ = [
    "MetadataUnpickler",
    "SafeFileSystemReader",
    "SafeLoadPlanner",
    "UnsafeCheckpointError",
    "read_metadata",
    "safe_load",
    "storage_sizes",
]

"""raypipe uses Ray through its public APIs only: no ``ray._private``, no ``_internal``
module, no entry point that exists to skip a check of the public one, no edits to a
built Ray Data LLM processor's stages, and no warnings filter that hides a warning.

Each remaining use is listed in ``EXCEPTIONS`` with its reason; the list may only
shrink: an entry whose use is gone fails the test until it is removed.
"""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raypipe"

#: What is denied, by name: the pattern of its use in the package's source.
DENIED = {
    "ray._private": re.compile(r"\bray\._private\b"),
    "_internal module": re.compile(r"\b(?:from|import)\s+ray\.[\w.]*\b_internal\b"),
    "map_batches_internal": re.compile(r"\bmap_batches_internal\b"),
    "unvalidated map_batches": re.compile(r"\b_map_batches_without_batch_size_validation\b"),
    "edits a built processor's stage": re.compile(r"\bmap_batches_kwargs\b"),
    "warnings filter": re.compile(r"\bwarnings\.(?:filterwarnings|simplefilter)\("),
    "ray_remote_args": re.compile(r"\bray_remote_args\s*="),
}

#: (module, denied name) -> why it is still there. Only ever shrinks.
EXCEPTIONS = {
    ("train/worker.py", "warnings filter"): (
        "torch's FSDP2 view warning and transformers' gradient-checkpointing rename, "
        "printed by every worker on every step; no Ray warning."
    ),
}


def uses() -> set[tuple[str, str]]:
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        for line in path.read_text().splitlines():
            code = line.split("#", 1)[0]
            for name, pattern in DENIED.items():
                if pattern.search(code):
                    found.add((module, name))
    return found


def test_ray_is_used_through_its_public_apis_only():
    found = uses()
    unlisted = sorted(found - set(EXCEPTIONS))
    assert not unlisted, f"denied uses of Ray (see this module's docstring): {unlisted}"


def test_the_exception_list_only_shrinks():
    stale = sorted(set(EXCEPTIONS) - uses())
    assert not stale, f"these uses are gone: remove them from EXCEPTIONS: {stale}"


def test_the_deny_list_finds_what_it_denies():
    samples = {
        "ray._private": "from ray._private.state import state",
        "_internal module": "from ray.data._internal.compute import X",
        "map_batches_internal": "ds.map_batches_internal(fn)",
        "unvalidated map_batches": "ds._map_batches_without_batch_size_validation(fn)",
        "edits a built processor's stage": "stage.map_batches_kwargs.update(x=1)",
        "warnings filter": 'warnings.filterwarnings("ignore")',
        "ray_remote_args": 'ray.data.read_datasource(s, ray_remote_args={"num_cpus": 0})',
    }
    assert set(samples) == set(DENIED)
    for name, text in samples.items():
        assert DENIED[name].search(text), name

"""What guards OUT before and during a generation run (raypipe.generate.pipeline step 0).

- :func:`take_lease`: one run at a time (:mod:`raypipe.lease`).
- :func:`nothing_to_add`: a run asking for fewer rows than OUT holds, or exactly what a
  finished OUT holds, does nothing.
- :func:`check_shared_out`: on a multi-node cluster, a local-path OUT must be a folder
  every node sees.
- :func:`lease_lost`: the :class:`~raypipe.errors.LeaseLost` behind an error raised in
  the run's actors or tasks.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from raypipe.errors import ConfigError
from raypipe.generate.config import GenerateConfig
from raypipe.generate.store import OutputStore
from raypipe.storage import tmp_name

log = logging.getLogger("raypipe.generate")


def take_lease(cfg: GenerateConfig, store: OutputStore, take_over: bool):
    """OUT's lease for this run (raypipe.lease), or LeaseHeld / LeaseExpired."""
    from raypipe.lease import Lease

    try:
        return Lease(store.uri, cfg.lease_ttl_s, cfg.lease_renew_s).acquire(take_over)
    except OSError as e:
        raise ConfigError(
            f"cannot write the lease file under {store.uri}: {e}. Choose a writable --out."
        ) from None


def nothing_to_add(
    cfg: GenerateConfig, store: OutputStore, names: list[str], identity_changed: bool = False
) -> dict[str, Any] | None:
    """OUT's manifest, with a note, when the run has nothing to add; None otherwise.

    Nothing to add: ``num_samples`` is below the rows OUT holds (rows are never
    removed), or OUT already holds every ability's quota of ``num_samples`` and its
    manifest is current (it counts the rows OUT holds, and every planned id is accepted
    or rejected). A re-run of a finished job then returns at once, before any actor or
    model starts. ``names``: the run's abilities, in catalog order. A finished OUT
    whose identity change this run accepted still runs, so that the change is recorded.
    """
    manifest = store.read_json("manifest.json")
    if manifest is None:
        return None
    per_ability = store.done_ids()[1]
    held = sum(per_ability.values())
    if cfg.num_samples < held:
        note = (
            f"{store.uri} holds {held} accepted rows, more than num_samples={cfg.num_samples}: "
            "nothing to do (rows are never removed). Use the first rows of OUT/data for a "
            "smaller set, or raise num_samples to extend the dataset."
        )
    elif not identity_changed and _complete(cfg, store, manifest, per_ability, names):
        note = (
            f"{store.uri} already holds num_samples={cfg.num_samples} accepted rows, every "
            "ability's share: nothing to do. Raise num_samples to extend the dataset."
        )
    else:
        return None
    log.info(note)
    return {**manifest, "num_samples": held, "note": note}


def _complete(cfg, store, manifest, per_ability: dict[str, int], names: list[str]) -> bool:
    """OUT holds each ability's quota, and the manifest of a run that ended without a
    stop counts exactly what OUT holds."""
    from raypipe.generate.manifest import count_ids
    from raypipe.generate.pipeline import quotas

    quota = quotas(cfg, names)
    if set(per_ability) - set(quota) or any(per_ability.get(a, 0) != n for a, n in quota.items()):
        return False
    counts = manifest.get("counts") or {}
    if counts.get("accepted") != sum(quota.values()) or not counts.get("balanced"):
        return False
    if manifest.get("stopped") is not None:  # the job reports the stop; a run clears it
        return False
    return bool(count_ids(store)["balanced"])


def check_shared_out(store: OutputStore, run_on=None) -> None:
    """On a cluster of more than one node, refuse a local-path OUT unless every node
    sees the same folder: a marker file written by a task on each other node must be
    visible here (else each node would keep its own OUT/cache, and a resume pays again).

    ``run_on(node_id, fn, *args)`` runs ``fn`` on that node (tests pass their own).
    """
    if not store.local:
        return
    import ray

    here = ray.get_runtime_context().get_node_id()
    others = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not others:
        return
    run_on = run_on or _run_on_node
    marker = tmp_name("shared-check")
    paths = {node: f"{store.root}/{marker}-{node[:12]}" for node in others}
    for node, path in paths.items():
        run_on(node, _write_marker, path)
    unseen = [node for node, path in paths.items() if not os.path.exists(path)]
    for path in paths.values():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    if unseen:
        raise ConfigError(
            f"--out {store.uri} is a local path, but this Ray cluster has {len(others) + 1} "
            f"nodes and {len(unseen)} of them do not see it (a file written there does not "
            "appear here): each node would keep its own part of OUT and OUT/cache, and a "
            "resume would pay again. Give shared storage, e.g. --out "
            "s3://BUCKET/PATH, or a folder every node mounts."
        )


def _write_marker(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"raypipe")


def _run_on_node(node_id: str, fn, *args) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(fn).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
    )
    with contextlib.suppress(Exception):  # a node that cannot run it does not see OUT either
        ray.get(task.remote(*args), timeout=120)


def lease_lost(error: BaseException, lease):
    """The LeaseLost behind ``error`` (raised in an actor or task), or None."""
    from raypipe.errors import LeaseLost

    if lease.lost is not None:
        return lease.lost
    seen = error
    while seen is not None:
        if isinstance(seen, LeaseLost):
            return LeaseLost(str(seen).split("LeaseLost: ")[-1].strip())
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    if "LeaseLost" in str(error):  # wrapped by Ray Data as text
        try:
            lease.check()
        except LeaseLost as e:
            return e
    return None

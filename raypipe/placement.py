"""Where actor pools run: the one place raypipe builds Ray resource requests.

Every actor pool (render, quality, the LLM writers, vLLM engines, evaluation inference)
asks Ray for its actors through :func:`actor_resources`, from the same fields in each
pool's config: CPUs, GPUs, ``resources`` (custom Ray resources, e.g.
``{render_slot: 1}`` to keep rendering on node types that declare that resource) and
``accelerator_type`` (Ray's ``A100``-style GPU model constraint). A pool whose request
no node can meet yet is what makes a Ray autoscaler add nodes of a type that can.

vLLM engines (``llm.vllm``: ``cpus_per_worker``, ``gpus_per_worker``, ``resources``,
``accelerator_type``) get one engine worker's request from :func:`actor_resources` too
(:func:`raypipe.llm.vllm.worker_request`), which the engines' Serve deployment
takes as its replicas' actor options, or for a tensor-parallel engine as one
placement-group bundle per rank with ``accelerator_type`` as a label resource
(:func:`raypipe.llm.vllm.deployment_options`). The writers' request and answer
halves around the engines are LLM-client actors
(``llm_actor_cpus``, ``llm_actor_resources``).

``device: auto`` (:func:`cluster_can_have_gpus`) asks for GPUs when the cluster has
GPUs now *or can add them*: the autoscaler's node types are read on the head, in order:

1. the cluster config the autoscaler reports to Ray's GCS (autoscaler v2:
   ``get_max_resources_from_cluster_config``);
2. the autoscaling config file the running monitor of *this* cluster was started with
   (its ``--autoscaling-config`` argument, found in ``/proc`` by the GCS address; Linux);
3. ``~/ray_bootstrap_config.yaml``, where ``ray up`` puts the config on the head (a
   ``ray job submit`` driver runs there).

A node type counts when it declares ``resources: {GPU: N}`` with ``max_workers`` above
0. Ray's cloud providers can also fill resources from the instance type inside the
autoscaler only; declare ``resources`` on GPU node types (``cluster.yaml`` does) so
``auto`` sees them, or set ``device: cuda``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from raypipe.errors import ConfigError

log = logging.getLogger(__name__)

#: Resources that have their own fields (num_cpus, num_gpus) and are refused in ``resources``.
RESERVED_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})

#: Where ``ray up`` writes the autoscaling config on the head node.
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


def check_resources(
    resources: dict[str, float] | None,
    field: str,
    cpu_field: str,
    gpu_field: str | None = None,
) -> dict[str, float]:
    """Validate a pool's custom resources (config field ``field``); returns a plain dict.
    CPUs and GPUs have their own fields (``cpu_field``, ``gpu_field``)."""
    resources = dict(resources or {})
    for name, amount in resources.items():
        if name in RESERVED_RESOURCES:
            own = gpu_field if name == "GPU" and gpu_field else cpu_field
            hint = (
                f"set {own}" if name in ("CPU", "GPU") and own else "Ray sets memory from the node"
            )
            if name == "GPU" and not gpu_field:
                hint = "this pool does not run on GPUs"
            raise ConfigError(
                f"{field}: {name!r} is not a custom resource; {hint} (custom resources are "
                "names a node type declares, such as {render_slot: 1})"
            )
        if not isinstance(amount, (int, float)) or amount <= 0:
            raise ConfigError(f"{field}.{name} must be a positive number, not {amount!r}")
    return resources


def check_accelerator_type(value: str | None, field: str) -> str | None:
    """An ``accelerator_type`` Ray knows (``A100``, ``H100``, ``L4``, ...), or None."""
    if value is None:
        return None
    from ray.util import accelerators

    known = sorted({v for k, v in vars(accelerators).items() if k.isupper() and isinstance(v, str)})
    if value not in known:
        import difflib

        close = difflib.get_close_matches(value, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"{field} {value!r} is not one Ray knows{hint}; known: " + ", ".join(known)
        )
    return value


def start_ray(address: str | None = None, local_cpus: int | None = None, **kwargs) -> None:
    """Join the cluster (under ``ray job submit``, ``address`` or RAY_ADDRESS) or start a
    local Ray, unless this process already runs one: what the jobs call before any work
    (library functions use the Ray that is running). A local Ray started here gets at
    least ``local_cpus`` logical CPUs: what a generation run's actor pools reserve, plus
    the task that cuts render batches (``raypipe.generate.pipeline.local_cpus``), which
    may be more than a small machine's cores."""
    import ray

    if ray.is_initialized():
        return
    if local_cpus and not address and not os.environ.get("RAY_ADDRESS"):
        try:
            ray.init(num_cpus=max(os.cpu_count() or 1, local_cpus), **kwargs)
            return
        except ValueError as e:  # a local cluster from `ray start` runs here: join it
            if "existing cluster" not in str(e):
                raise
    ray.init(address=address, **kwargs)


def actor_resources(
    *,
    num_cpus: float,
    num_gpus: float | None = None,
    resources: dict[str, float] | None = None,
    accelerator_type: str | None = None,
) -> dict[str, Any]:
    """Ray remote args of one actor of a pool (for ``map_batches`` or ``.options``).

    ``accelerator_type`` only applies to actors that ask for GPUs (Ray places it as a
    constraint on the GPU's model); it is dropped, with a log line, for CPU actors.
    """
    args: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        args["num_gpus"] = num_gpus
    if resources:
        args["resources"] = dict(resources)
    if accelerator_type:
        if num_gpus:
            args["accelerator_type"] = accelerator_type
        else:
            log.info("accelerator_type %s ignored: this pool runs on CPU", accelerator_type)
    return args


# ---------------------------------------------------------------------------------------
# What GPUs the cluster has or can add
# ---------------------------------------------------------------------------------------


def _gcs_address() -> str | None:
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - not connected
        return None


def _monitor_config_path(gcs_address: str | None) -> str | None:
    """The ``--autoscaling-config`` of the autoscaler monitor serving ``gcs_address``."""
    if not gcs_address or not Path("/proc").is_dir():
        return None
    port = gcs_address.rsplit(":", 1)[-1]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in args if a]
        if not any(a.endswith("monitor.py") for a in text):
            continue
        gcs = [a.split("=", 1)[1] for a in text if a.startswith("--gcs-address=")]
        if not gcs or gcs[0].rsplit(":", 1)[-1] != port:
            continue
        for a in text:
            if a.startswith("--autoscaling-config="):
                return a.split("=", 1)[1]
    return None


def node_type_gpus(config: dict[str, Any]) -> dict[str, float]:
    """GPUs per node of each node type that can have nodes, from an autoscaling config."""
    out = {}
    for name, node_type in (config.get("available_node_types") or {}).items():
        gpus = float((node_type.get("resources") or {}).get("GPU", 0) or 0)
        can_exist = (
            int(node_type.get("max_workers", 0) or 0) > 0
            or int(node_type.get("min_workers", 0) or 0) > 0
        )
        if gpus > 0 and can_exist:
            out[name] = gpus
    return out


def _read_config(path: str) -> dict[str, Any] | None:
    import yaml

    try:
        text = Path(path).expanduser().read_text()
    except OSError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            return None
    return data if isinstance(data, dict) else None


def cluster_gpu_capacity() -> dict[str, Any]:
    """GPUs of the connected cluster now, and what its autoscaler can add.

    Returns ``{"now": GPUS, "can_add": {NODE_TYPE: GPUS_PER_NODE}, "source": WHERE}``;
    ``source`` says where the node types were read (a config file path, or None when the
    cluster has no autoscaler config this process can read: Ray has no public API for
    it; set ``RAYPIPE_AUTOSCALING_CONFIG``, or the pool's ``device: cuda``).
    """
    import ray

    now = float(ray.cluster_resources().get("GPU", 0) or 0)
    candidates = [
        os.environ.get("RAYPIPE_AUTOSCALING_CONFIG"),
        _monitor_config_path(_gcs_address()),
    ]
    candidates.append(BOOTSTRAP_CONFIG)
    for path in candidates:
        if not path:
            continue
        config = _read_config(path)
        if config is not None:
            return {"now": now, "can_add": node_type_gpus(config), "source": path}
    return {"now": now, "can_add": {}, "source": None}


def cluster_can_have_gpus() -> bool:
    """Whether the connected cluster has GPUs now or its autoscaler can add GPU nodes."""
    capacity = cluster_gpu_capacity()
    if capacity["now"] > 0:
        return True
    if capacity["can_add"]:
        log.info(
            "no GPUs in the cluster yet; its autoscaler can add GPU nodes (%s, from %s)",
            ", ".join(f"{k}: {v:g}" for k, v in capacity["can_add"].items()),
            capacity["source"],
        )
        return True
    return False


def uses_gpu(device: str) -> bool:
    """``cuda`` -> True, ``cpu`` -> False, ``auto`` -> :func:`cluster_can_have_gpus`."""
    if device == "cuda":
        return True
    if device == "cpu":
        return False
    return cluster_can_have_gpus()


__all__ = [
    "actor_resources",
    "check_accelerator_type",
    "check_resources",
    "cluster_can_have_gpus",
    "cluster_gpu_capacity",
    "node_type_gpus",
    "uses_gpu",
]

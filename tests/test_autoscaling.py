"""Placement and autoscaling on Ray's fake multi-node cluster (a real head, a real
autoscaler monitor, nodes started as local raylets when the autoscaler adds them)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ray_cluster import ray_head  # noqa: E402

from raypipe.config import load_config  # noqa: E402
from raypipe.errors import ConfigError  # noqa: E402
from raypipe.generate.config import GenerateConfig, RenderConfig  # noqa: E402
from raypipe.placement import actor_resources, check_resources, node_type_gpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

#: The head has no render_slot; nodes of type `render` have one each and start at 0
#: (with CPUs to spare, as GPU nodes have: Ray Data only grows a pool within the CPUs
#: the cluster has now, so a node's spare CPUs are what let the next actor be asked
#: for, which then waits for its render_slot and makes the autoscaler add a node);
#: a GPU node type at 0 workers is what `render.device=auto` must see.
NODE_TYPES = {
    "render": {
        "resources": {"CPU": 4, "render_slot": 1},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 2,
    },
    "gpu": {
        "resources": {"CPU": 4, "GPU": 1},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 1,
    },
}


@pytest.fixture(scope="module")
def fake_cluster(tiny_dir):
    env = None
    import os

    env = dict(os.environ, RAYPIPE_TINY_DIR=str(tiny_dir), HF_HUB_OFFLINE="1")
    # A head with room for the run's light pools and the 1-CPU task that cuts render
    # batches: with 2 CPUs that task waits for a node, and the autoscaler adds one of
    # the GPU type for it.
    with ray_head(num_cpus=4, autoscaling={"workers": NODE_TYPES}, env=env) as head:
        yield head


@pytest.mark.slow
def test_render_pool_makes_the_autoscaler_add_nodes(fake_cluster, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(REPO / "jobs" / "generate.py"),
        "--config",
        str(REPO / "raypipe" / "configs" / "generate" / "demo.yaml"),
        "--out",
        str(out),
        "num_samples=78",
        "llm_batch_chunks=1",  # a block per 5-prompt request: many blocks to share
        "render.resources={render_slot: 1}",
        "render.min_actors=1",
        "render.max_actors=2",
        "render.batch_size=4",
        "render.steps=30",  # rendering is the bottleneck: the pool wants a second actor
        "render.width=32",
        "render.height=32",
        "part_max_seconds=5",
    ]
    done = subprocess.run(
        cmd, env=fake_cluster["env"], capture_output=True, text=True, timeout=400, cwd=REPO
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = pq.read_table(out / "data", columns=["id", "meta"]).to_pylist()
    assert len(rows) == 78 and len({r["id"] for r in rows}) == 78
    nodes = Counter(json.loads(r["meta"])["render_node"] for r in rows)
    # Rendered only on autoscaled render nodes (the head has no render_slot), by more
    # than one actor: the pool grew, and the autoscaler added a node per actor.
    assert len(nodes) == 2, nodes
    probe = (
        "import json, ray\n"
        "ray.init()\n"
        "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))\n"
    )
    alive = subprocess.run(
        [sys.executable, "-c", probe], env=fake_cluster["env"], capture_output=True, text=True
    )
    resources = json.loads(alive.stdout.strip().splitlines()[-1])
    render_nodes = {n for n, r in resources.items() if r.get("render_slot")}
    assert set(nodes) <= render_nodes and len(render_nodes) == 2
    assert not any(r.get("GPU") for r in resources.values())  # no GPU node was asked for


@pytest.mark.slow
def test_device_auto_asks_for_gpus_the_autoscaler_can_add(fake_cluster):
    probe = (
        "import json, ray\n"
        "ray.init()\n"
        "from raypipe.generate.config import RenderConfig\n"
        "from raypipe.generate.render import render_pool_args, render_uses_gpu\n"
        "from raypipe.placement import cluster_gpu_capacity\n"
        "for device in ('auto', 'cpu'):\n"
        "    cfg = RenderConfig(device=device, gpus_per_actor=1, accelerator_type='A100')\n"
        "    print(json.dumps({'device': device, 'capacity': cluster_gpu_capacity(),\n"
        "        'request': render_pool_args(cfg, render_uses_gpu(cfg))}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env=fake_cluster["env"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    auto, cpu = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    # No GPU in the cluster now; the autoscaler's config (read from the head's monitor)
    # has a GPU node type at 0 workers: `auto` asks for a GPU per actor.
    assert auto["capacity"]["now"] == 0 and auto["capacity"]["can_add"] == {"gpu": 1.0}
    assert auto["capacity"]["source"].endswith("autoscaling.json")
    assert auto["request"]["num_gpus"] == 1 and auto["request"]["accelerator_type"] == "A100"
    assert "num_gpus" not in cpu["request"] and "accelerator_type" not in cpu["request"]


def test_placement_fields_reach_every_pool_request():
    cfg = load_config(
        GenerateConfig,
        REPO / "raypipe" / "configs" / "generate" / "demo.yaml",
        [
            "render.resources={render_slot: 1}",
            "quality.resources={cpu_pool: 0.5}",
            "llm_actor_resources={api_slot: 1}",
        ],
    )
    from raypipe.generate.render import render_pool_args

    assert render_pool_args(cfg.render, False)["resources"] == {"render_slot": 1.0}
    assert actor_resources(num_cpus=1, resources=cfg.quality.resources) == {
        "num_cpus": 1,
        "resources": {"cpu_pool": 0.5},
    }
    assert cfg.llm_actor_resources == {"api_slot": 1.0}
    gpu = render_pool_args(RenderConfig(accelerator_type="H100", gpus_per_actor=0.5), True)
    assert gpu["num_gpus"] == 0.5 and gpu["accelerator_type"] == "H100"


def test_placement_errors_say_what_to_do():
    with pytest.raises(ConfigError, match="set render.gpus_per_actor"):
        load_config(GenerateConfig, None, ["render.resources={GPU: 1}"])
    with pytest.raises(ConfigError, match="did you mean A100"):
        load_config(GenerateConfig, None, ["render.accelerator_type=A1000"])
    with pytest.raises(ConfigError, match="positive number"):
        check_resources({"slot": 0}, "render.resources", "render.cpus_per_actor")
    config = {"available_node_types": NODE_TYPES | {"off": {"resources": {"GPU": 8}}}}
    assert node_type_gpus(config) == {"gpu": 1.0}  # `off` can have no nodes

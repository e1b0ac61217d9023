"""Placement of the ``vllm`` backend's engines and LLM stages: the Ray resource requests
built through raypipe.placement.actor_resources, as the engines' Serve deployment takes
them. Nothing here imports vLLM or Ray Serve, or starts an engine (the Ray Data plan of
a writer on the engines is checked in tests/vllm/test_vllm_generate.py, where Serve is
installed).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from raypipe.config import load_config
from raypipe.errors import ConfigError
from raypipe.generate.config import GenerateConfig
from raypipe.llm.vllm import deployment_options, service_name, worker_request
from raypipe.placement import actor_resources

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "raypipe" / "configs" / "generate" / "demo-vllm.yaml"
PLACED = [
    "llm.vllm.gpus_per_worker=1",
    "llm.vllm.cpus_per_worker=2",
    "llm.vllm.accelerator_type=H100",
    "llm.vllm.resources={llm_slot: 1}",
    "llm_actor_resources={api_slot: 1}",
]


def config(*overrides: str) -> GenerateConfig:
    return load_config(GenerateConfig, PRESET, list(overrides))


def test_engine_request_is_the_pools_own_helper_with_the_same_fields():
    cfg = config(*PLACED).llm
    one = actor_resources(
        num_cpus=2.0, num_gpus=1.0, resources={"llm_slot": 1.0}, accelerator_type="H100"
    )
    assert worker_request(cfg) == one
    # The short-lived engine is one actor for all its tensor-parallel workers.
    assert worker_request(cfg, 2) == {
        "num_cpus": 4.0,
        "num_gpus": 2.0,
        "resources": {"llm_slot": 2.0},
        "accelerator_type": "H100",
    }
    # An engine of one worker is one Serve replica with that very request.
    options = deployment_options(cfg)
    assert options["ray_actor_options"] == one
    assert "placement_group_bundles" not in options
    # CPU engines: accelerator_type applies to GPU actors only (as for every pool).
    cpu = config(*PLACED, "llm.vllm.gpus_per_worker=0").llm
    assert "accelerator_type" not in deployment_options(cpu)["ray_actor_options"]
    assert "num_gpus" not in worker_request(cpu) and "accelerator_type" not in worker_request(cpu)


def test_tensor_parallel_engine_is_one_placement_group_with_the_accelerator_label():
    cfg = config(*PLACED, "llm.vllm.tensor_parallel_size=2").llm
    options = deployment_options(cfg)
    bundle = {"CPU": 2.0, "GPU": 1.0, "llm_slot": 1.0, "accelerator_type:H100": 0.001}
    assert options["placement_group_bundles"] == [bundle, bundle]
    assert options["placement_group_strategy"] == "PACK"
    assert options["ray_actor_options"] == {"num_cpus": 0}  # the replica sits in bundle 0


def test_engine_pool_size_and_the_application_name():
    fixed = config().llm
    options = deployment_options(fixed)
    assert options["num_replicas"] == 1 and "autoscaling_config" not in options
    assert options["max_constructor_retry_count"] == fixed.vllm.engine_restarts + 1
    scaled = config("llm.vllm.min_engines=1", "llm.vllm.max_engines=3").llm
    assert deployment_options(scaled)["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": scaled.vllm.batch_size,
    }
    # Same model, engine arguments and placement: the same engines, whatever else the
    # run's config says; anything the engines run differently: other engines.
    name = service_name(fixed)
    assert name.startswith("raypipe-vllm-")
    assert service_name(config("llm.temperature=0.3", "seed=9").llm) == name
    assert service_name(scaled) != name
    assert service_name(config("llm.vllm.max_model_len=2048").llm) != name
    assert service_name(config("llm.vllm.keep_engines=true").llm) == name
    assert service_name(config("llm.vllm.deploy_timeout_s=5").llm) == name  # how long to wait


def test_engine_placement_errors_say_what_to_do():
    with pytest.raises(ConfigError, match="set llm.vllm.gpus_per_worker"):
        config("llm.vllm.resources={GPU: 1}")
    with pytest.raises(ConfigError, match="set llm.vllm.cpus_per_worker"):
        config("llm.vllm.resources={CPU: 1}")
    with pytest.raises(ConfigError, match="did you mean H100"):
        config("llm.vllm.accelerator_type=H1000")
    with pytest.raises(ConfigError, match="positive number"):
        config("llm.vllm.resources={llm_slot: 0}")

"""Placement of the ``vllm`` backend's engines and LLM stages: the Ray resource requests
built through raypipe.placement.actor_resources, as they land in the Ray Data plan.

Nothing here imports vLLM or starts an engine: building a Ray Data LLM processor and
appending it to a dataset only plans it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from raypipe.config import GenerateConfig, load_config
from raypipe.errors import ConfigError
from raypipe.llm.vllm_backend import engine_placement, worker_request
from raypipe.placement import actor_resources

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "jobs" / "configs" / "demo-vllm.yaml"
PLACED = [
    "llm.vllm.gpus_per_worker=1",
    "llm.vllm.cpus_per_worker=2",
    "llm.vllm.accelerator_type=H100",
    "llm.vllm.resources={llm_slot: 1}",
    "llm_actor_resources={api_slot: 1}",
]


def config(*overrides: str) -> GenerateConfig:
    return load_config(GenerateConfig, PRESET, list(overrides))


def remote_args(ds) -> dict[str, dict]:
    """Each map operator of ``ds``'s logical plan: its name -> its Ray remote args and
    remote-args function (what Ray Data asks Ray for, per actor or task)."""
    out, op = {}, ds._logical_plan.dag
    while op is not None:
        if hasattr(op, "ray_remote_args"):
            out[op.name] = {**op.ray_remote_args, "fn": op.ray_remote_args_fn}
        op = op.input_dependencies[0] if op.input_dependencies else None
    return out


def vllm_plan(cfg: GenerateConfig) -> dict[str, dict]:
    import ray

    from raypipe.generate.engine import add_vllm_writer
    from raypipe.generate.text import PromptWriter

    ds = ray.data.from_items([{"x": 1}])
    ds = add_vllm_writer(
        ds, PromptWriter, cfg, negative_prompt="", llm=cfg.llm.model_dump(), cache_dir=None,
        catalog_dirs=[], run_seed=0,
    )  # fmt: skip
    return remote_args(ds)


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
    placement = engine_placement(cfg)
    assert placement["accelerator_type"] == "H100"
    assert placement["placement_group_config"]["bundles"] == [
        {"CPU": 2.0, "GPU": 1.0, "llm_slot": 1.0}
    ]
    # CPU engines: accelerator_type applies to GPU actors only (as for every pool).
    cpu = config(*PLACED, "llm.vllm.gpus_per_worker=0").llm
    assert engine_placement(cpu)["accelerator_type"] is None
    assert "num_gpus" not in worker_request(cpu) and "accelerator_type" not in worker_request(cpu)


def test_engine_and_llm_stage_requests_land_in_the_ray_data_plan(ray_local, tiny_dir):
    stages = vllm_plan(config(*PLACED))
    engine = stages["MapBatches(vLLMEngineStageUDF)"]
    assert engine["num_gpus"] == 1.0 and engine["num_cpus"] == 2.0
    assert engine["resources"] == {"llm_slot": 1.0}
    assert engine["accelerator_type"] == "H100"
    for half in ("MapBatches(EngineRequests)", "MapBatches(EngineAnswers)"):
        assert stages[half]["resources"] == {"api_slot": 1.0}, half  # llm_actor_resources
        assert stages[half]["num_cpus"] == 0.05
    # Tensor parallel: Ray Data LLM builds one placement group per engine from the
    # bundles, with the accelerator_type as a label resource in each.
    tp = vllm_plan(config(*PLACED, "llm.vllm.tensor_parallel_size=2"))
    fn = tp["MapBatches(vLLMEngineStageUDF)"]["fn"]
    bundles_per_engine, accelerator_type, group = fn.args
    assert bundles_per_engine == 2 and accelerator_type == "H100"
    assert group["bundles"] == [{"CPU": 2.0, "GPU": 1.0, "llm_slot": 1.0}] * 2


def test_engine_placement_errors_say_what_to_do():
    with pytest.raises(ConfigError, match="set llm.vllm.gpus_per_worker"):
        config("llm.vllm.resources={GPU: 1}")
    with pytest.raises(ConfigError, match="set llm.vllm.cpus_per_worker"):
        config("llm.vllm.resources={CPU: 1}")
    with pytest.raises(ConfigError, match="did you mean H100"):
        config("llm.vllm.accelerator_type=H1000")
    with pytest.raises(ConfigError, match="positive number"):
        config("llm.vllm.resources={llm_slot: 0}")

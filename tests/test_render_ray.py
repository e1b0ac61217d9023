"""The image stages on Ray Data: a render actor that dies is replaced and no row is lost;
render and quality ask Ray for what their devices need; the CPU path runs end to end."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
from PIL import Image

from raypipe.generate.config import QualityConfig, RenderConfig
from raypipe.generate.quality import QualityCheck, RenderAndCheck, add_image_stages
from raypipe.generate.render import Renderer, add_render
from raypipe.schema import row_seed, rows_to_table
from raypipe.tiny import resolve_tiny


def crash_once_renderer(markers: str) -> type[Renderer]:
    """A Renderer that, before a block, claims (deletes) one marker file from ``markers``
    if any is left and then exits abruptly: each marker crashes one actor once.

    Defined in a function, so Ray ships the class by value to its workers (test modules
    are not importable there); the real Renderer underneath is imported by name.
    """

    class CrashOnceRenderer(Renderer):
        def process(self, batch):
            for name in sorted(os.listdir(markers)):
                try:
                    os.remove(os.path.join(markers, name))  # atomic: one actor wins each
                except OSError:
                    continue
                os._exit(1)
            return super().process(batch)

    return CrashOnceRenderer


def animal_rows(n: int) -> list[dict]:
    return [
        {
            "id": f"animal-s0-{i:07d}",
            "ability": "animal",
            "keywords": ["fox"],
            "prompt": f"a ((fox)) number {i} in a forest",
            "negative_prompt": "",
            "seed": row_seed(f"animal-s0-{i:07d}"),
            "conversations": None,
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def render_cfg(tiny_dir):
    return RenderConfig(
        # A resolved folder, so actors don't depend on the driver's RAYPIPE_TINY_DIR.
        model=resolve_tiny("raypipe-tiny/tiny-sd"),
        device="cpu",
        width=64,
        height=64,
        steps=2,
        batch_size=2,
    )


def test_crashed_render_actor_is_replaced(ray_local, render_cfg, tmp_path):
    ray = ray_local
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "crash-once").write_text("")
    rows = animal_rows(8)
    ds = add_render(ray.data.from_items(rows), render_cfg, stage=crash_once_renderer(str(faults)))
    out = ds.take_all()

    assert not any(faults.iterdir())  # the marker was claimed: an actor did exit
    assert sorted(r["id"] for r in out) == [r["id"] for r in rows]
    assert all(r["reject_stage"] is None for r in out)
    for r in out:
        assert Image.open(io.BytesIO(r["image"]["bytes"])).size == (64, 64)

    # The same rows rendered here, in other batches and another process, match to the byte
    # (with the actor's thread count: Ray gives a 1-CPU actor one OpenMP thread).
    local = Renderer(render_cfg.model_copy(update={"batch_size": 8}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = {r["id"]: r for r in local(rows_to_table(rows[::-1])).to_pylist()}
    finally:
        torch.set_num_threads(threads)
    assert all(again[r["id"]]["image"]["bytes"] == r["image"]["bytes"] for r in out)


def _map_ops(ds) -> list:
    """The Dataset's MapBatches operators, source first (its logical plan, not run)."""
    ops, op = [], ds._logical_plan.dag
    while op is not None:
        if type(op).__name__ == "MapBatches":
            ops.append(op)
        op = op.input_dependencies[0] if op.input_dependencies else None
    return ops[::-1]


QUALITY_ON = QualityConfig(
    clip_model="raypipe-tiny/tiny-clip",
    safety_checker="raypipe-tiny/tiny-safety-checker",
    grounding_top_k=3,
)


def test_gpu_render_runs_the_checks_in_its_own_actors(ray_local):
    # Nothing runs: this inspects what the builder asks Ray for.
    render = RenderConfig(model="x", device="cuda", gpus_per_actor=1, min_actors=2, max_actors=8)
    banks = {"animal": ["fox", "owl"]}
    (op,) = _map_ops(
        add_image_stages(ray_local.data.from_items([{"id": "a"}]), render, QUALITY_ON, banks)
    )
    assert op.fn is RenderAndCheck
    assert op.ray_remote_args["num_gpus"] == 1
    # A block that kills its GPU actor every time fails the run (Ray Data restarts the
    # actor itself without limit by default).
    assert op.ray_remote_args["max_task_retries"] == render.max_task_retries
    assert (op.compute.min_size, op.compute.max_size) == (2, 8)
    kwargs = op.fn_constructor_kwargs
    assert kwargs["render"].device == "cuda" and kwargs["quality"] == QUALITY_ON
    assert kwargs["banks"] == banks
    # Full GPU batches: the stream cuts blocks of render.batch_size rows before the pool.
    assert op.batch_size == render.batch_size


def test_cpu_render_and_quality_are_two_cpu_pools(ray_local):
    render = RenderConfig(model="x", device="cpu", max_actors=3)
    quality = QUALITY_ON.model_copy(update={"max_actors": 2, "cpus_per_actor": 0.5})
    ops = _map_ops(
        add_image_stages(ray_local.data.from_items([{"id": "a"}]), render, quality, {"a": ["b"]})
    )
    assert [op.fn for op in ops] == [Renderer, QualityCheck]
    assert all("num_gpus" not in op.ray_remote_args for op in ops)
    assert "max_task_retries" not in ops[0].ray_remote_args  # Ray Data's default on CPU
    assert [op.batch_size for op in ops] == [render.batch_size, None]
    assert ops[1].ray_remote_args["num_cpus"] == 0.5 and ops[1].compute.max_size == 2
    assert ops[1].fn_constructor_kwargs["banks"] == {"a": ["b"]}
    # Without grounding the banks stay home.
    plain = _map_ops(
        add_image_stages(
            ray_local.data.from_items([{"id": "a"}]), render, QualityConfig(), {"a": ["b"]}
        )
    )
    assert plain[1].fn_constructor_kwargs["banks"] is None


def test_image_stages_on_cpu_end_to_end(ray_local, render_cfg):
    rows = animal_rows(4)
    quality = QualityConfig(clip_model=resolve_tiny("raypipe-tiny/tiny-clip"), clip_min_score=-1.0)
    out = add_image_stages(ray_local.data.from_items(rows), render_cfg, quality, {}).take_all()
    assert sorted(r["id"] for r in out) == [r["id"] for r in rows]
    for r in out:
        assert r["reject_stage"] is None, r["reject_reason"]
        meta = json.loads(r["meta"])
        assert {"render_s", "image_std", "clip_score"} <= set(meta)

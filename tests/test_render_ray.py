"""The render stage on Ray Data: a render actor that dies is replaced and no row is lost."""

from __future__ import annotations

import io
import os

import torch
from PIL import Image

from raypipe.config import RenderConfig
from raypipe.generate.render import Renderer, add_render
from raypipe.schema import row_seed, rows_to_table
from raypipe.testing import resolve_tiny


def crash_once_renderer(markers: str) -> type[Renderer]:
    """A Renderer that, before a block, claims (deletes) one marker file from ``markers``
    if any is left and then exits abruptly: each marker crashes one actor once.

    Defined in a function, so Ray ships the class by value to its workers (test modules
    are not importable there); the real Renderer underneath is imported by name.
    """

    class CrashOnceRenderer(Renderer):
        def __call__(self, batch):
            for name in sorted(os.listdir(markers)):
                try:
                    os.remove(os.path.join(markers, name))  # atomic: one actor wins each
                except OSError:
                    continue
                os._exit(1)
            return super().__call__(batch)

    return CrashOnceRenderer


def test_crashed_render_actor_is_replaced(tiny_dir, ray_local, tmp_path):
    ray = ray_local
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "crash-once").write_text("")
    cfg = RenderConfig(
        # A resolved folder, so actors don't depend on the driver's RAYPIPE_TINY_DIR.
        model=resolve_tiny("raypipe-tiny/tiny-sd"),
        device="cpu",
        width=64,
        height=64,
        steps=2,
        batch_size=2,
    )
    rows = [
        {
            "id": f"animal-s0-{i:07d}",
            "ability": "animal",
            "prompt": f"a ((fox)) number {i} in a forest",
            "negative_prompt": "",
            "seed": row_seed(f"animal-s0-{i:07d}"),
        }
        for i in range(8)
    ]
    stage = crash_once_renderer(str(faults))
    out = add_render(ray.data.from_items(rows), cfg, stage=stage).take_all()

    assert not any(faults.iterdir())  # the marker was claimed: an actor did exit
    assert sorted(r["id"] for r in out) == [r["id"] for r in rows]
    assert all(r["reject_stage"] is None for r in out)
    for r in out:
        assert Image.open(io.BytesIO(r["image"]["bytes"])).size == (64, 64)

    # The same rows rendered here, in other batches and another process, match to the byte
    # (with the actor's thread count: Ray gives a 1-CPU actor one OpenMP thread).
    local = Renderer(cfg.model_copy(update={"batch_size": 8}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = {r["id"]: r for r in local(rows_to_table(rows[::-1])).to_pylist()}
    finally:
        torch.set_num_threads(threads)
    assert all(again[r["id"]]["image"]["bytes"] == r["image"]["bytes"] for r in out)

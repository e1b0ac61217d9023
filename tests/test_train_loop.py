"""Ray Train + FSDP2 tuning of a tiny LLaVA on CPU workers (tiny models, fixture data).

A TorchTrainer fit costs ~20 s of fixed overhead on a 2-core machine (plus reading and
ordering the data), so three runs, each made once per module, serve every assertion:

- ``run_1w``: 1 worker, stage 2, memorisable Parquet, no interruption: the reference;
- ``run_2w``: the same data, order and global batch on 2 workers, checkpoint every 5
  steps, and one worker process dies after step 7 (:func:`dying_loop`, the package's
  worker loop with its ``train_step`` wrapped, installed from here):
  Ray Train restarts the group, which resumes from the step-5 checkpoint. Its losses
  must match the reference step for step: a wrong LR step, optimiser state, data
  position or loss normalisation would each show far above the float tolerance;
- ``run_json``: a model composed from a CLIP tower + Llama with a linear projector,
  stage 1, LLaVA JSON + StableLLaVA JSON inputs with corrupt rows and rows whose image
  paths leave the image folder (``../``, absolute, ``s3://`` on the moto server), Ray
  Data's dynamic split between workers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from fixture_data import write_fixture_llava_json, write_fixture_run, write_fixture_stablellava_json

from raypipe.config import build_config
from raypipe.train.config import TrainConfig, load_train_config
from raypipe.train.sources import DROP_OUTSIDE
from raypipe.train.trainer import fit

pytestmark = pytest.mark.slow

STEPS = 16  # 32 rows / global batch 8 = 4 steps per epoch, 4 epochs


def dying_loop(step: int, marker: Path):
    """Fault injection: the worker loop, whose last worker kills its own process right
    after global ``step``, once per test (``marker`` records it), as a preempted node
    would. Installed as ``raypipe.train.worker.train_loop_per_worker`` on the driver."""

    def loop(config):
        import ray.train

        from raypipe.train import worker

        real_step, done = worker.train_step, [0]

        def train_step(*args, **kwargs):
            out = real_step(*args, **kwargs)
            done[0] += 1  # the first attempt starts at step 0
            ctx = ray.train.get_context()
            last = ctx.get_world_rank() == ctx.get_world_size() - 1
            if done[0] == step and last and not marker.exists():
                marker.touch()
                os._exit(1)
            return out

        worker.train_step = train_step
        return worker.train_loop_per_worker(config)

    return loop


# Workers cannot import this module: the hook travels by value.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _stage2_config(**over) -> TrainConfig:
    base = [
        "global_batch_size=8",
        "micro_batch_size=2",
        "epochs=4",
        "report_every=16",  # each report waits for Ray Train's ~2 s poll
    ]
    return load_train_config("raypipe/configs/train/tiny.yaml", base + [f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module")
def parquet(tmp_path_factory, tiny_dir):
    # Written as a generation run writes: 8 parts (row groups) of 4 rows in OUT/data.
    out = tmp_path_factory.mktemp("parquet")
    write_fixture_run(str(out), 32, seed=0, rows_per_part=4)
    return out / "data"


@pytest.fixture(scope="module")
def run_1w(ray_local, parquet, tmp_path_factory):
    cfg = _stage2_config(num_workers=1, export="false", checkpoint_every_steps="null")
    return fit(cfg, [str(parquet)], tmp_path_factory.mktemp("run1w"))


@pytest.fixture(scope="module")
def run_2w(ray_local, parquet, tmp_path_factory):
    from raypipe.train import worker

    cfg = _stage2_config(
        num_workers=2,
        checkpoint_every_steps=5,
        keep_checkpoints=2,
        max_failures=1,
    )
    out = tmp_path_factory.mktemp("run2w")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(worker, "train_loop_per_worker", dying_loop(7, out / "died"))
        return fit(cfg, [str(parquet)], out)


def test_one_worker_memorises_the_fixture(run_1w):
    losses = run_1w.losses
    assert run_1w.steps == STEPS and len(losses) == STEPS
    assert run_1w.resumed_from_step == 0
    assert losses[0] > 5.0  # random init over a ~1k vocabulary
    assert losses[-1] < 0.35 * losses[0], losses
    assert sum(losses[-4:]) < sum(losses[:4]) / 3
    assert run_1w.drops == {}
    assert run_1w.tokens_per_s and run_1w.tokens_per_s > 0
    assert run_1w.mfu is None  # CPU


def test_two_workers_killed_and_resumed_match_one_worker(run_1w, run_2w):
    # The worker died after step 7; the latest checkpoint then was step 5.
    assert run_2w.resumed_from_step == 5
    assert run_2w.steps == STEPS and len(run_2w.losses) == STEPS
    torch.testing.assert_close(
        torch.tensor(run_2w.losses), torch.tensor(run_1w.losses), rtol=1e-4, atol=1e-4
    )


def test_each_of_two_workers_reads_half_the_image_bytes(run_1w, run_2w):
    # Counted by the readers from the row groups they read (the resumed attempt ran
    # steps 6-16: epoch 2 from its second step, and epochs 3 and 4 whole).
    total = run_1w.image_bytes_epoch
    assert total and run_1w.image_bytes_by_rank[0] == 4 * total  # 4 epochs, one worker
    assert len(run_2w.image_bytes_by_rank) == 2
    for worker in run_2w.image_bytes_by_rank:
        assert worker <= 0.6 * 3 * total, (worker, total)


def test_checkpoints_are_sharded_and_describe_the_run(run_2w):
    run_dir = Path(run_2w.run_dir)
    kept = sorted(p.name for p in run_dir.glob("step_*"))
    # keep_checkpoints=2; the last step (16) always gets one, off the every-5 grid.
    assert {"step_00000015", "step_00000016"} <= set(kept) and kept[-1] == "step_00000016"
    assert run_2w.checkpoint.endswith("step_00000016")
    state = json.loads((run_dir / "step_00000015" / "trainer_state.json").read_text())
    assert state["step"] == 15 and state["samples_seen"] == 15 * 8
    assert state["losses"] == run_2w.losses[:15]
    files = {p.name for p in (run_dir / "step_00000015").iterdir()}
    # torch.distributed.checkpoint shards of both workers, and each worker's loop state
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= files
    assert {"trainer_state_rank0.pt", "trainer_state_rank1.pt"} <= files


def test_stage2_export_loads_with_plain_transformers_and_keeps_the_tower(run_2w, parquet):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from raypipe.tiny import resolve_tiny
    from raypipe.train.encoding import SampleEncoder, collate
    from raypipe.train.step import token_loss_sum

    start = resolve_tiny("raypipe-tiny/tiny-llava")
    initial = LlavaForConditionalGeneration.from_pretrained(start)
    before = initial.state_dict()
    model = LlavaForConditionalGeneration.from_pretrained(run_2w.export_dir)
    processor = AutoProcessor.from_pretrained(run_2w.export_dir)
    after = model.state_dict()
    # Stage 2: vision tower bit-identical; projector and LLM trained.
    vision = [k for k in before if ".vision_tower." in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    for part in (".multi_modal_projector.", ".language_model."):
        keys = [k for k in before if part in k]
        assert any(not torch.equal(before[k], after[k]) for k in keys), part

    # The export carries the trained weights: lower loss on the training samples.
    rows = [
        {**row, "image": row["image"]["bytes"], "image_error": None, "source": "fixture"}
        for path in sorted(Path(parquet).glob("*.parquet"))[:2]
        for row in pq.read_table(path).to_pylist()
    ]
    encoder = SampleEncoder(run_2w.export_dir, "vicuna_v1", 256, True)
    batch = collate(encoder(rows), processor.tokenizer.pad_token_id)
    losses = {}
    for name, m in (("initial", initial), ("export", model)):
        with torch.no_grad():
            logits = m(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
            ).logits
        supervised = (batch["labels"][:, 1:] != -100).sum()
        losses[name] = float(token_loss_sum(logits, batch["labels"]) / supervised)
    assert losses["export"] < 0.5 * losses["initial"], losses

    # And it generates, as any llava-hf checkpoint.
    from PIL import Image

    prompt = "USER: <image>\nWhat colour is the square? ASSISTANT:"
    inputs = processor(
        images=Image.new("RGB", (32, 32), (220, 30, 30)), text=prompt, return_tensors="pt"
    )
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    assert text.strip()


class RequestLog(logging.Handler):
    """The moto server's request lines (werkzeug logs one per request, in this process)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _outside_rows(data: Path, llava: Path, s3_server) -> list[str]:
    """Append to the LLaVA JSON four rows whose real images lie outside its folder:
    ``../``, nested ``../``, absolute and ``s3://`` (on the moto server). Their keys."""
    outside = data / "outside"
    outside.mkdir()
    image = next((llava.parent / "images").glob("*.png"))
    (outside / "secret.png").write_bytes(image.read_bytes())
    bucket = s3_server.make_bucket("train-outside")
    s3_server.filesystem().open_output_stream(f"{bucket}/secret.png").write(image.read_bytes())
    turns = [
        {"from": "human", "value": "<image>\nWhat colour is the square?"},
        {"from": "gpt", "value": "It is a red square."},
    ]
    paths = [
        "../outside/secret.png",
        "images/../../outside/secret.png",
        str(outside / "secret.png"),
        s3_server.uri(bucket, "secret.png"),
    ]
    records = json.loads(llava.read_text())
    records += [
        {"id": f"outside-{i}", "image": path, "conversations": turns}
        for i, path in enumerate(paths)
    ]
    llava.write_text(json.dumps(records))
    return [f"{bucket}/secret.png"]


@pytest.fixture(scope="module")
def run_json(ray_local, tiny_dir, s3_server, tmp_path_factory):
    data = tmp_path_factory.mktemp("json")
    # 12 + 3 corrupt + 4 outside LLaVA rows, 11 + 2 corrupt StableLLaVA rows: 32, even, so
    # the equal split between 2 workers reads every row.
    llava = write_fixture_llava_json(data / "llava", 12, seed=1, corrupt=True)
    outside_keys = _outside_rows(data, llava, s3_server)
    stable = write_fixture_stablellava_json(data / "stable", 11, seed=2, corrupt=True)
    cfg = build_config(
        TrainConfig,
        {
            "name": "stage1",
            "model": {
                "vision_tower": "raypipe-tiny/tiny-clip-vision",
                "llm": "raypipe-tiny/tiny-llama",
                "projector": "linear",
            },
            "stage": 1,
            "data": {"max_length": 256, "deterministic_order": False},
            "num_workers": 2,
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "lr": 1e-2,
            "epochs": 2,  # each dropped row is still counted once
        },
    )
    requests = RequestLog()
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.INFO)
    werkzeug.addHandler(requests)
    try:
        result = fit(cfg, [str(llava), str(stable)], tmp_path_factory.mktemp("run-json"))
        s3_server.filesystem().open_input_file(f"{outside_keys[0]}.not-there")
    except FileNotFoundError:
        pass  # a GET the log must show: the capture works
    finally:
        werkzeug.removeHandler(requests)
        werkzeug.setLevel(level)
    return cfg, result, requests.lines, outside_keys


def test_stage1_on_json_sources_trains_only_the_projector(run_json):
    from transformers import LlavaForConditionalGeneration

    from raypipe.train.model import build_model

    cfg, result, _, _ = run_json
    assert result.steps == 16  # 16 rows per worker, 2 per worker per step, 2 epochs
    assert result.drops == {
        "missing image file": 2,
        "no <image> in first human turn": 1,
        "undecodable image": 2,
        DROP_OUTSIDE: 4,
    }
    start = build_model(cfg)[0].state_dict()  # same seed: same projector init
    after = LlavaForConditionalGeneration.from_pretrained(result.export_dir).state_dict()
    assert set(after) == set(start)
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert changed == {
        "model.multi_modal_projector.linear_1.weight",
        "model.multi_modal_projector.linear_1.bias",
    }
    # The linear projector's second layer is the identity, exported as such.
    eye = torch.eye(after["model.multi_modal_projector.linear_2.weight"].shape[0])
    assert torch.equal(after["model.multi_modal_projector.linear_2.weight"], eye)


def test_image_paths_outside_the_folder_are_never_read(run_json):
    # ../, nested ../, absolute and s3:// rows pointing at real images: all dropped with
    # one reason (drops above), and the bucket never served the outside object.
    _, result, requests, outside_keys = run_json
    assert any(".not-there" in line for line in requests), requests  # the log is live
    for key in outside_keys:
        assert not any(f"GET /{key} " in line or f"HEAD /{key} " in line for line in requests)
    assert result.steps == 16 and result.final_loss is not None  # the other rows trained


def test_trains_from_and_to_s3_and_resumes_from_the_bucket(
    ray_local, tiny_dir, s3_server, tmp_path
):
    import pyarrow.fs as pafs
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    bucket = s3_server.make_bucket("train-uris")
    data = s3_server.uri(bucket, "run/data")
    write_fixture_run(s3_server.uri(bucket, "run"), 16, seed=3, rows_per_part=4)
    out = s3_server.uri(bucket, "train")
    over = dict(num_workers=1, global_batch_size=4, checkpoint_every_steps=1, report_every=1)
    first = fit(_stage2_config(max_steps=2, export="false", **over), [data], out)
    assert first.steps == 2 and first.checkpoint.startswith("s3://")
    fs = s3_server.filesystem()
    listed = fs.get_file_info(pafs.FileSelector(f"{bucket}/train/tiny", recursive=False))
    assert {"step_00000001", "step_00000002"} <= {i.base_name for i in listed}

    again = fit(_stage2_config(max_steps=3, **over), [data], out)
    assert again.resumed_from_step == 2 and again.steps == 3
    assert again.losses[:2] == first.losses
    local = tmp_path / "export"
    local.mkdir()
    pafs.copy_files(f"{bucket}/train/export", str(local), source_filesystem=fs)
    LlavaForConditionalGeneration.from_pretrained(local)
    processor = AutoProcessor.from_pretrained(local)
    assert processor.chat_template  # the training format, to serve as a chat model
    assert json.loads((local / "raypipe_lineage.json").read_text())

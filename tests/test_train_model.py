"""Tuning parts that need no Ray workers: config, model build and freeze policy, LoRA merge,
FSDP2 wrapping with activation checkpointing, per-rank data slices, schedule, fail-fast job.
"""

from __future__ import annotations

import io
import subprocess
import sys

import pyarrow as pa
import pytest
import torch

from raypipe.config import build_config
from raypipe.errors import ConfigError, ModelError
from raypipe.train.batches import StepBatcher, split_step_rows
from raypipe.train.config import TrainConfig, load_train_config
from raypipe.train.model import apply_freeze_policy, build_model, check_model_source
from raypipe.train.step import build_optimizer, token_loss_sum

TINY_LLAVA = {"llava": "raypipe-tiny/tiny-llava"}
COMPOSED = {
    "vision_tower": "raypipe-tiny/tiny-clip-vision",
    "llm": "raypipe-tiny/tiny-llama",
    "projector": "linear",
}


def _cfg(**fields) -> TrainConfig:
    return build_config(TrainConfig, {"model": TINY_LLAVA, **fields})


def _png(colour=(220, 30, 30), size=32) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _row(i: int, colour: str = "red") -> dict:
    return {
        "id": f"r{i}",
        "source": "test",
        "image": _png(),
        "image_error": None,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"},
            {"from": "gpt", "value": f"It is a {colour} square."},
        ],
    }


# --- config ------------------------------------------------------------------------------


def test_batch_arithmetic_errors_say_what_to_do():
    with pytest.raises(ConfigError, match=r"global_batch_size \(10\) must be a multiple.*8"):
        _cfg(global_batch_size=10, micro_batch_size=2, num_workers=4)
    cfg = _cfg(global_batch_size=32, micro_batch_size=2, num_workers=4)
    assert cfg.grad_accum_steps == 4
    with pytest.raises(ConfigError, match="lora applies to stage 2"):
        _cfg(stage=1, lora={"rank": 4})
    with pytest.raises(ConfigError, match="not both"):
        build_config(TrainConfig, {"model": {**TINY_LLAVA, "llm": "x"}})
    with pytest.raises(ConfigError, match="name the model"):
        build_config(TrainConfig, {"model": {"vision_tower": "x"}})
    with pytest.raises(ConfigError, match="lr"):
        load_train_config("raypipe/configs/train/tiny.yaml", ["lr=-1"])


def test_presets_carry_llava15_hyperparameters():
    s1 = load_train_config("raypipe/configs/train/llava15-7b-stage1.yaml")
    s2 = load_train_config("raypipe/configs/train/llava15-7b-stage2.yaml")
    assert s1.model.vision_tower == "openai/clip-vit-large-patch14-336"
    assert s1.model.llm == "lmsys/vicuna-7b-v1.5" and s1.model.projector == "mlp2x_gelu"
    assert (s1.stage, s1.lr, s1.global_batch_size) == (1, 1e-3, 256)
    assert (s2.stage, s2.lr, s2.global_batch_size) == (2, 2e-5, 128)
    assert s2.model.llava.endswith("llava15-7b-stage1/export")  # stage 2 starts from stage 1
    for cfg in (s1, s2):
        assert cfg.epochs == 1 and cfg.warmup_ratio == 0.03 and cfg.weight_decay == 0
        assert cfg.use_gpu and cfg.compute_dtype == "bf16" and cfg.grad_accum_steps == 1
    tiny = load_train_config("raypipe/configs/train/tiny.yaml")
    assert not tiny.use_gpu and tiny.num_workers == 2 and tiny.worker_cpus < 1


# --- model -------------------------------------------------------------------------------


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_policy_per_stage(tiny_dir):
    model, _ = build_model(_cfg(stage=1))
    assert _trainable(model) and all("multi_modal_projector" in n for n in _trainable(model))
    apply_freeze_policy(model, 2)
    names = _trainable(model)
    assert not any("vision_tower" in n for n in names)
    assert any("language_model" in n for n in names) and "lm_head.weight" in names
    assert {n for n in names if "multi_modal_projector" in n} == {
        f"model.multi_modal_projector.linear_{i}.{k}" for i in (1, 2) for k in ("weight", "bias")
    }


def test_composed_linear_projector_is_one_trainable_linear(tiny_dir):
    model, processor = build_model(build_config(TrainConfig, {"model": COMPOSED, "stage": 2}))
    projector = model.model.multi_modal_projector
    assert torch.equal(projector.linear_2.weight, torch.eye(projector.linear_2.out_features))
    assert not projector.linear_2.weight.requires_grad and projector.linear_1.weight.requires_grad
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    # The vision tower and LLM carry the weights of their checkpoints.
    from transformers import AutoModelForCausalLM

    from raypipe.tiny import resolve_tiny

    llm = AutoModelForCausalLM.from_pretrained(resolve_tiny("raypipe-tiny/tiny-llama"))
    assert torch.equal(
        model.model.language_model.layers[0].mlp.up_proj.weight,
        llm.model.layers[0].mlp.up_proj.weight,
    )
    # Workers other than rank 0 build the same architecture without weights.
    meta, _ = build_model(build_config(TrainConfig, {"model": COMPOSED, "stage": 2}), on_meta=True)
    assert [(n, p.shape) for n, p in meta.named_parameters()] == [
        (n, p.shape) for n, p in model.named_parameters()
    ]
    assert all(p.is_meta for p in meta.parameters())


def test_lora_trains_adapters_and_projector_and_exports_merged(tiny_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from raypipe.train.export import plain_model_from_state_dict

    cfg = _cfg(
        stage=2, lora={"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
    )
    model, processor = build_model(cfg)
    names = _trainable(model)
    assert all("lora_" in n or "multi_modal_projector" in n for n in names)
    assert any("language_model" in n and "q_proj.lora_A" in n for n in names)
    assert not any("vision_tower" in n and "lora_" in n for n in dict(model.named_parameters()))
    # Adapters start as a no-op (B = 0); make them matter before merging.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    rows = [_row(0)]
    from raypipe.train.encoding import SampleEncoder, collate

    batch = collate(
        SampleEncoder(processor=processor, max_length=128)(rows), processor.tokenizer.pad_token_id
    )
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    plain = plain_model_from_state_dict(cfg, model.state_dict())
    assert type(plain) is LlavaForConditionalGeneration
    assert not any("lora" in k for k in plain.state_dict())
    plain.save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = reloaded(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    base = LlavaForConditionalGeneration.from_pretrained(model.get_base_model().name_or_path)
    with torch.no_grad():
        assert not torch.allclose(base.eval()(**inputs).logits, expected, atol=1e-3)


def test_model_ids_that_do_not_resolve_fail_with_what_to_do(tiny_dir):
    with pytest.raises(ModelError, match="does not resolve.*save_pretrained"):
        check_model_source(_cfg(model={"llava": "/no/such/checkpoint"}))
    with pytest.raises(ModelError, match="not a LLaVA checkpoint"):
        check_model_source(_cfg(model={"llava": "raypipe-tiny/tiny-llama"}))
    with pytest.raises(ModelError, match="CLIP vision towers"):
        check_model_source(
            _cfg(
                model={"vision_tower": "raypipe-tiny/tiny-llama", "llm": "raypipe-tiny/tiny-llama"}
            )
        )
    with pytest.raises(ModelError, match="unknown tiny model"):
        check_model_source(_cfg(model={"llava": "raypipe-tiny/nope"}))


# --- FSDP2 ---------------------------------------------------------------------------------


@pytest.fixture
def process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp2_with_activation_checkpointing_gives_the_same_gradients(tiny_dir, process_group):
    from raypipe.train.parallel import sharded_layers
    from raypipe.train.worker import setup_model

    rows = [_row(0, "red"), _row(1, "blue")]
    grads, kept = [], []
    for checkpointing in (False, True):
        cfg = _cfg(stage=2, num_workers=1, activation_checkpointing=checkpointing)
        model, processor = setup_model(cfg, 0, torch.device("cpu"))
        from torch.distributed.fsdp import FSDPModule

        assert isinstance(model, FSDPModule)
        assert all(isinstance(layer, FSDPModule) for layer in sharded_layers(model))
        assert len(sharded_layers(model)) == 4  # 2 CLIP encoder layers + 2 Llama layers
        from raypipe.train.encoding import SampleEncoder, collate

        batch = collate(
            SampleEncoder(processor=processor, max_length=128)(rows),
            processor.tokenizer.pad_token_id,
        )
        saved = []

        def pack(t, saved=saved):
            saved.append(1)
            return t

        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
            ).logits
        token_loss_sum(logits, batch["labels"]).backward()
        kept.append(len(saved))
        grads.append(
            {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        )
    assert kept[1] < kept[0] / 2  # checkpointed layers keep only their inputs for backward
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5)


def test_step_batcher_pads_with_inert_standin_batches(tiny_dir):
    cfg = _cfg(stage=2, num_workers=1, global_batch_size=4, micro_batch_size=2)
    model, processor = build_model(cfg)
    batcher = StepBatcher(cfg, processor, model.config)
    bad = {**_row(9), "image": b"not an image"}
    batches, drops = batcher([_row(0), bad])  # one good row, one undecodable: 2 micro-batches
    assert len(batches) == cfg.grad_accum_steps == 2
    assert batches[0]["input_ids"].shape[0] == 1
    assert [reason for reason, _, _ in drops] == ["undecodable image"]
    assert drops[0][2] == bad["id"]
    standin = batches[1]
    assert (standin["labels"] == -100).all()
    logits = model(
        input_ids=standin["input_ids"],
        attention_mask=standin["attention_mask"],
        pixel_values=standin["pixel_values"],
    ).logits  # image tokens match the vision features, so LLaVA accepts it
    loss = token_loss_sum(logits, standin["labels"])
    assert loss.item() == 0.0
    loss.backward()  # contributes nothing, but runs every layer as real batches do


# --- data order, schedule --------------------------------------------------------------------


class _Stream:
    """Stands in for a Ray DataIterator over rows {"i": ...} (no shuffle)."""

    def __init__(self, rows: list[int]):
        self.rows = rows
        self.seeds: list[int] = []

    def iter_batches(self, batch_size, local_shuffle_seed=None, **_):
        self.seeds.append(local_shuffle_seed)
        for s in range(0, len(self.rows), batch_size):
            yield pa.table({"i": self.rows[s : s + batch_size]})


def test_split_mode_takes_the_next_share_and_reshuffles_each_epoch():
    # (Deterministic mode: tests/test_train_shards.py.)
    stream = _Stream([0, 2, 4, 6, 8, 10])
    steps = split_step_rows(stream, start_step=0, total_steps=6, steps_per_epoch=3, share=4, seed=0)
    assert [[r["i"] for r in step] for step in steps] == [[0, 2, 4, 6], [8, 10], []] * 2
    assert len(set(stream.seeds)) == 2  # one local-shuffle seed per epoch
    resumed = split_step_rows(
        _Stream([0, 2, 4, 6, 8, 10]),
        start_step=4,
        total_steps=6,
        steps_per_epoch=3,
        share=4,
        seed=0,
    )
    assert [[r["i"] for r in step] for step in resumed] == [[8, 10], []]


def test_cosine_schedule_with_warmup_matches_transformers():
    from transformers import get_cosine_schedule_with_warmup

    cfg = _cfg(lr=1e-3, warmup_ratio=0.03)
    ours, scheduler = build_optimizer(torch.nn.Linear(2, 2), cfg, total_steps=100)
    ref_opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    ref = get_cosine_schedule_with_warmup(ref_opt, num_warmup_steps=3, num_training_steps=100)
    for _ in range(100):
        assert scheduler.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], abs=1e-12)
        ours.step(), scheduler.step(), ref_opt.step(), ref.step()
    assert {g["weight_decay"] for g in ours.param_groups} == {0.0}


# --- the job -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_job_fails_before_starting_ray_on_bad_inputs(tiny_dir, tmp_path):
    def job(*args):
        return subprocess.run(
            [sys.executable, "jobs/train.py", "--config", "raypipe/configs/train/tiny.yaml", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    missing = job("--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    out = job("--data", str(empty), "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "nothing to train on" in out.stderr
    from fixture_data import write_fixture_llava_json

    data = write_fixture_llava_json(tmp_path / "d", 2)
    out = job("--data", str(data), "--out", str(tmp_path / "o"), "model.llava=/no/such/model")
    assert out.returncode == 2 and "does not resolve" in out.stderr
    assert "Started a local Ray instance" not in out.stderr + out.stdout

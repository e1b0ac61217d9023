"""The `raypipe` console command, and the override parser it shares with the job scripts:
suggestions for mistyped fields, and dict keys that contain dots."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from raypipe.abilities import ABILITIES, load_catalog
from raypipe.config import apply_overrides, build_config, iter_fields, load_config
from raypipe.errors import ConfigError
from raypipe.generate.config import GenerateConfig

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "raypipe" / "configs" / "generate" / "demo.yaml"
RAYPIPE = Path(sys.executable).parent / "raypipe"


def raypipe(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it (from the checkout)."""
    assert RAYPIPE.is_file(), (
        f"{RAYPIPE} is missing: pyproject.toml's [project.scripts] installs it; reinstall "
        "the project (`pip install -e .`, as scripts/bootstrap.sh does)"
    )
    return subprocess.run(
        [str(RAYPIPE), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout_s
    )


def test_console_script_is_declared():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["raypipe"] == "raypipe.cli:main"


def test_raypipe_help_lists_the_commands():
    res = raypipe("--help")
    assert res.returncode == 0, res.stderr
    for command in ("generate", "train", "evaluate", "export-llava", "curate"):
        assert re.search(rf"^  {command} ", res.stdout, re.M), res.stdout
    wrong = raypipe("genrate")
    assert wrong.returncode == 2
    assert "Did you mean `raypipe generate`?" in wrong.stderr


def test_generate_help_lists_presets_abilities_and_every_field():
    res = raypipe("generate", "--help")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith("usage: raypipe generate ")
    presets = out.split("presets (--config", 1)[1].split("abilities (", 1)[0]
    for name in ("demo", "sd15-openai", "turbo-local-llm"):
        assert re.search(rf"^  {re.escape(name)} ", presets, re.M), presets
    for name in ("tiny", "eval-tiny", "base"):  # training / evaluation presets, the base
        assert not re.search(rf"^  {re.escape(name)} ", presets, re.M), presets
    abilities = out.split("abilities (", 1)[1].split("config fields", 1)[0]
    catalog = load_catalog()
    for name in ABILITIES:
        assert re.search(
            rf"^  {name} +{re.escape(catalog[name].description[:30])}", abilities, re.M
        )
    fields = " ".join(out.split("config fields", 1)[1].split())  # unwrapped
    count = 0
    for path, info, _ in iter_fields(GenerateConfig):
        assert f" {path}" in fields, f"{path} is not in `raypipe generate --help`"
        if info.description:
            assert " ".join(info.description.split()) in fields, f"{path}'s description"
        count += 1
    assert count > 60  # nested fields (llm.*, render.*, quality.*) included
    assert "render.batch_size: int = 8 " in fields
    assert re.search(r"llm\.backend: (\w+\|)*offline(\|\w+)* = 'offline' ", fields)  # choices
    assert "llm.prices.gpt-4.1-mini=" in fields  # how to set one price


@pytest.mark.parametrize("command", ["train", "evaluate", "export-llava", "curate"])
def test_every_command_runs_its_job_script(command):
    res = raypipe(command, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: raypipe {command} ")
    # The job script's own parser: the same arguments as `python jobs/<script>.py`.
    script = REPO / "jobs" / (command.replace("-", "_") + ".py")
    direct = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert direct.stdout.split("\n", 1)[1] == res.stdout.split("\n", 1)[1] or (
        # usage lines wrap at a different width when the program name differs
        direct.stdout.split("options:", 1)[-1] == res.stdout.split("options:", 1)[-1]
    )


def test_unknown_override_suggests_the_closest_field():
    with pytest.raises(ConfigError, match=r"did you mean render\.batch_size\?") as e:
        load_config(GenerateConfig, DEMO, ["render.batchsize=3"])
    fields = str(e.value).split("Fields of render (RenderConfig): ", 1)[1]
    assert "batch_size" in fields.split(", ") and "width" in fields.split(", ")
    with pytest.raises(ConfigError, match=r"did you mean llm\.backend\?"):
        load_config(GenerateConfig, DEMO, ["llm.bakend=openai"])
    # A field given at the wrong level: the closest field anywhere.
    with pytest.raises(ConfigError, match=r"did you mean render\.steps\?"):
        load_config(GenerateConfig, DEMO, ["stepz=2"])
    with pytest.raises(ConfigError, match="no field has a similar name"):
        load_config(GenerateConfig, DEMO, ["zzzqqq=2"])
    # The same in a preset file (pydantic reports it; the hint is added).
    with pytest.raises(ConfigError, match=r"render\.batchsize: .*did you mean render\.batch_size"):
        build_config(GenerateConfig, {"render": {"batchsize": 3}})
    # And through the command, before anything starts (exit 2, a user error).
    res = raypipe(
        "generate", "--config", str(DEMO), "--out", "unused", "--dry-run", "render.batchsize=3"
    )
    assert res.returncode == 2
    assert "did you mean render.batch_size?" in res.stderr
    assert not (REPO / "unused").exists()


def test_dict_keys_may_contain_dots():
    cfg = load_config(
        GenerateConfig,
        DEMO,
        ["llm.prices.gpt-4.1-mini=[0.5, 2.0]", "llm.prices.acme/chat-v1.5=[1, 3]"],
    )
    prices = cfg.llm.prices
    assert prices["gpt-4.1-mini"] == (0.5, 2.0)
    assert prices["acme/chat-v1.5"] == (1.0, 3.0)
    assert prices["gpt-4o"] == (2.5, 10.0), "setting one price must keep the others"
    # A whole dict still replaces the default.
    cfg = load_config(GenerateConfig, DEMO, ["llm.prices={m.1: [1, 1]}"])
    assert cfg.llm.prices == {"m.1": (1.0, 1.0)}
    # Without a model to read paths against, every dot is a level (the old behaviour).
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}
    # End to end: the dry run prices a dotted model name with the override.
    args = ["generate", "--config", str(DEMO), "--out", "unused", "--dry-run"]
    args += ["--num-samples", "13", "llm.backend=openai", "llm.model=acme-1.5"]
    free = raypipe(*args)
    paid = raypipe(*args, "llm.prices.acme-1.5=[1000, 1000]")
    assert free.returncode == 0 and paid.returncode == 0, free.stderr + paid.stderr
    assert re.search(r"total USD +\$0\.0000", free.stdout)
    assert "acme-1.5 at 1000 / 1000 USD per million tokens" in paid.stdout
    assert not re.search(r"total USD +\$0\.0000", paid.stdout)


def test_presets_by_name_and_kind(tmp_path, monkeypatch):
    from raypipe import presets
    from raypipe.evaluate.config import EvaluateConfig, is_evaluation_preset
    from raypipe.train.config import TrainConfig

    assert "demo" in presets.names("generate") and "base" not in presets.names("generate")
    assert presets.names("train") == ["llava15-7b-stage1", "llava15-7b-stage2", "tiny"]
    assert presets.names("evaluate") == ["eval-tiny"]
    # A name loads the preset of the config's kind; `base:` chains resolve in its folder.
    by_name = load_config(GenerateConfig, "demo")
    assert by_name == load_config(GenerateConfig, DEMO) == load_config(GenerateConfig, "demo.yaml")
    assert load_config(TrainConfig, "tiny").name == "tiny"
    assert load_config(EvaluateConfig, "eval-tiny").benchmark == "eval-tiny-bench"
    # A name of another kind, or a typo: the presets of this kind, and the closest one.
    with pytest.raises(ConfigError, match=r"no generate preset named 'tiny'.*demo"):
        load_config(GenerateConfig, "tiny")
    with pytest.raises(ConfigError, match=r"Did you mean 'demo'\?"):
        load_config(GenerateConfig, "dmeo")
    # A path is a path, from any folder; a file in the working folder wins over a name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo.yaml").write_text("base: " + str(DEMO) + "\nseed: 7\n")
    assert load_config(GenerateConfig, "demo.yaml").seed == 7
    assert load_config(GenerateConfig, "demo").seed == 0
    assert is_evaluation_preset("eval-tiny") and not is_evaluation_preset("eval-tiny-bench")


def test_every_preset_loads_with_its_base_chain():
    from raypipe import presets
    from raypipe.evaluate.config import EvaluateConfig, benchmark_config
    from raypipe.evaluate.run import Plan
    from raypipe.train.config import TrainConfig

    models = {"generate": GenerateConfig, "train": TrainConfig, "evaluate": EvaluateConfig}
    for kind, model in models.items():
        for name in presets.names(kind):
            load_config(model, name)  # raises on a broken `base:` or an unknown field
    # The evaluation preset names generation and training presets of their own kinds.
    ev = load_config(EvaluateConfig, "eval-tiny")
    folder = presets.folder("evaluate")
    assert benchmark_config(ev, folder).benchmark_question_mix
    plan = Plan(ev, folder, Path("unused"))
    assert plan.train_cfg.name == "tiny" and plan.train_gen_cfg == load_config(GenerateConfig, "demo")

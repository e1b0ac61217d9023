"""raypipe installed from a wheel, outside the checkout: the command finds its jobs and
presets in the installed package (nothing is read from the repository).

The wheel is built from a copy of the sources (so no build/ folder lands in the
checkout) without network (--no-build-isolation: this environment's setuptools), and
installed with --no-deps into a new virtual environment whose only link to this one is a
.pth line naming this environment's site-packages: the dependencies (torch, ray, ...)
are reused, while this environment's own raypipe (an editable install, whose .pth hooks
are not run from a path added that way) stays out of sight.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
N = 13  # one row per ability


def run(*cmd, cwd: Path, env=None, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s
    )


def build_wheel(dest: Path) -> Path:
    src = dest / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "raypipe", src / "raypipe", ignore=shutil.ignore_patterns("__pycache__"))
    res = run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "--no-index", "-w", dest / "dist", src, cwd=dest,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,) = (dest / "dist").glob("raypipe-*.whl")
    return wheel


def new_env(root: Path, wheel: Path) -> Path:
    """A venv with ``wheel`` installed; its dependencies come from this environment."""
    res = run(sys.executable, "-m", "venv", "--without-pip", root, cwd=root.parent)
    assert res.returncode == 0, res.stderr
    python = root / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=root)
    (Path(site.stdout.strip()) / "reuse-test-env.pth").write_text(
        sysconfig.get_path("purelib") + "\n"
    )
    res = run(
        sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        wheel, cwd=root,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def installed(tmp_path_factory, tiny_dir):
    tmp = tmp_path_factory.mktemp("wheel")
    env_dir = new_env(tmp / "env", build_wheel(tmp))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(
        PATH=os.pathsep.join([str(env_dir / "bin"), env.get("PATH", "")]),
        VIRTUAL_ENV=str(env_dir),
        RAYPIPE_TINY_DIR=str(tiny_dir),
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    work = tmp / "elsewhere"  # a folder outside the checkout, without jobs/ or configs
    work.mkdir()
    return env_dir, env, work


def test_the_installed_package_is_the_wheel(installed):
    env_dir, env, work = installed
    res = run(env_dir / "bin" / "python", "-c", "import raypipe; print(raypipe.__file__)",
              cwd=work, env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr
    where = Path(res.stdout.strip()).resolve()
    assert where.is_relative_to(env_dir.resolve()), where
    assert not where.is_relative_to(REPO), where


def test_installed_command_lists_presets_and_helps_every_job(installed):
    env_dir, env, work = installed
    raypipe = env_dir / "bin" / "raypipe"
    res = run(raypipe, "generate", "--help", cwd=work, env=env)
    assert res.returncode == 0, res.stderr
    presets = res.stdout.split("presets (--config", 1)[1].split("abilities (", 1)[0]
    assert "could not list" not in res.stdout
    for name in ("demo", "sd15-openai", "eval-tiny-bench"):
        assert f"\n  {name} " in presets, presets
    res = run(raypipe, "train", "--help", cwd=work, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: raypipe train ")
    assert "\n  tiny " in res.stdout and "llava15-7b-stage2" in res.stdout
    res = run(raypipe, "evaluate", "run", "--help", cwd=work, env=env)
    assert res.returncode == 0, res.stderr
    assert "\n  eval-tiny " in res.stdout
    # A preset name of another kind is refused before anything starts (exit 2).
    res = run(raypipe, "train", "--config", "demo", "--out", "t", cwd=work, env=env)
    assert res.returncode == 2 and "no train preset named 'demo'" in res.stderr, res.stderr


@pytest.mark.slow  # about 75 s here: a local Ray, tiny models built, 13 images rendered
def test_installed_command_generates_the_demo(installed):
    env_dir, env, work = installed
    out = work / "out"
    args = ["generate", "--config", "demo", "--out", out, "--num-samples", N]
    res = run(env_dir / "bin" / "raypipe", *args, cwd=work, env=env, timeout_s=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    rows = pq.read_table(out / "data").to_pylist()
    assert len(rows) == N and len({r["id"] for r in rows}) == N
    assert f"wrote {N} rows" in res.stdout
    assert "RayDeprecationWarning" not in res.stdout + res.stderr  # no deprecated Ray path

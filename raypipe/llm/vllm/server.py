"""One vLLM engine: the body of the engine deployment's replicas."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from raypipe.llm.vllm.failures import root_cause
from raypipe.llm.vllm.request import decode

#: Bytes of the replica's own log read back for a failed engine start.
LOG_TAIL_BYTES = 256 * 1024


class EngineServer:
    """One vLLM engine (``vllm.AsyncLLMEngine``): the body of the engine deployment's
    replicas. ``generate`` answers the stream's rows (Ray Data LLM's serve stage calls it
    and reads one item); ``complete`` answers one request of :class:`VLLMBackend`."""

    def __init__(self, path: str, kwargs: dict[str, Any]):
        import vllm

        logs = _own_logs()
        try:
            args = vllm.AsyncEngineArgs(model=path, **kwargs)
            self.engine = vllm.AsyncLLMEngine.from_engine_args(args)
        except Exception as e:
            # vLLM's engine core runs in a child process: its error is only logged there
            # (to this replica's log files, which it inherits), and the parent raises
            # "Engine core initialization failed. See root cause above". Read it back,
            # so that Serve's message, and the run's, carry the engine's own line.
            cause = root_cause(_logged_since(logs))
            if cause and cause not in str(e):
                raise RuntimeError(f"the vLLM engine could not start: {cause}") from e
            raise
        self._tokenizer = None

    async def _run(self, prompt_ids, params: dict[str, Any]):
        import uuid

        import vllm
        from vllm.sampling_params import StructuredOutputsParams

        try:
            from vllm.inputs import TokensPrompt
        except ImportError:  # pragma: no cover - vLLM >= 0.19 moved it
            from vllm.inputs.llm import TokensPrompt
        # Rows from Ray Data hold numpy scalars, which vLLM's request encoder refuses.
        p = {k: (v.item() if hasattr(v, "item") else v) for k, v in dict(params).items()}
        so = p.pop("structured_outputs", None)
        sampling = vllm.SamplingParams(
            **p, structured_outputs=StructuredOutputsParams(**dict(so)) if so else None
        )
        prompt = TokensPrompt(prompt_token_ids=[int(i) for i in prompt_ids])
        final = None
        async for out in self.engine.generate(
            request_id=uuid.uuid4().hex, prompt=prompt, sampling_params=sampling
        ):
            final = out
        return final

    async def generate(self, request: dict[str, Any]):
        out = await self._run(request["prompt_token_ids"], request["sampling_params"])
        yield {
            "rp_tokens": list(out.outputs[0].token_ids),
            "rp_prompt_tokens": len(out.prompt_token_ids),
        }

    async def complete(self, prompt_ids: list[int], params: dict[str, Any]) -> dict[str, Any]:
        out = await self._run(prompt_ids, params)
        if self._tokenizer is None:
            import inspect

            tokenizer = self.engine.get_tokenizer()  # a coroutine in some vLLM versions
            self._tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
        tokens = list(out.outputs[0].token_ids)
        return {
            "text": decode(self._tokenizer, tokens),
            "prompt_tokens": len(out.prompt_token_ids),
            "completion_tokens": len(tokens),
            "finish_reason": out.outputs[0].finish_reason,
        }

    async def check_health(self) -> None:
        if self.engine.errored:  # Serve replaces a replica whose engine died
            raise RuntimeError(f"the vLLM engine died: {self.engine.dead_error!r}")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()  # its engine-core process, which Ray does not track


def _own_logs() -> list[tuple[Path, int]]:
    """This process's stdout and stderr where they are files (Ray's worker log files),
    with their sizes now."""
    logs = []
    for fd in (1, 2):
        try:
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if path.is_file():
                logs.append((path, path.stat().st_size))
        except OSError:  # not Linux, or not a file: no log to read back
            continue
    return logs


def _logged_since(logs: list[tuple[Path, int]]) -> str:
    """What was written to ``logs`` since their sizes were taken (the last
    :data:`LOG_TAIL_BYTES` of it)."""
    text = []
    for path, size in logs:
        try:
            with open(path, "rb") as f:
                f.seek(max(size, path.stat().st_size - LOG_TAIL_BYTES))
                text.append(f.read().decode("utf-8", "replace"))
        except OSError:
            continue
    return "\n".join(text)

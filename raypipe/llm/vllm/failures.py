"""An engine that died or could not start, as a :class:`ModelError` that says what to do."""

from __future__ import annotations

import re

from raypipe.errors import ModelError
from raypipe.llm.config import LLMConfig
from raypipe.llm.vllm.settings import DEPLOYMENT

#: What names an actor that holds a vLLM engine in Ray's errors: a replica of the engine
#: deployment (``ServeReplica:<app>:EngineServer``) or the service that starts it.
ENGINE_ACTORS = (DEPLOYMENT, "EngineService")
#: Ray's errors for an actor that died, as they read in the text of an error that wraps one.
ACTOR_DEATHS = ("ActorDiedError", "ActorUnavailableError", "RayActorError")


def engine_failure(exc: BaseException, cfg: LLMConfig, engine: bool = False) -> ModelError | None:
    """The :class:`ModelError` that says what to do when ``exc`` is a vLLM engine that
    died or could not start, else None (the caller re-raises ``exc``).

    Ray reports an actor that died as a ``RayActorError`` (``ActorDiedError``,
    ``ActorUnavailableError``) naming the actor's class; an engine replica that dies
    mid-request fails the request that way, and the stream with it (Serve replaces the
    replica; the same command resumes the run). An engine that cannot start is a
    ``ModelError`` from :class:`EngineService`, found through Ray's wrapping and returned
    as it is. Any other actor that died (a render actor out of memory) is no engine
    failure; ``engine=True``: the caller called nothing but an engine, so any actor death
    counts.
    """
    from ray.exceptions import RayActorError, RayError

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ModelError) and not isinstance(e, RayError):
            return e
        text = str(e)
        names_engine = engine or any(n in text for n in ENGINE_ACTORS)
        # A stage that called a dead engine fails with its own error (Ray Data's
        # UserCodeException), whose text holds the actor error it got.
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if isinstance(e, RayActorError):
            died, first = type(e).__name__, (lines or [""])[0]
        elif isinstance(e, RayError):
            died = next((n for n in ACTOR_DEATHS if n in text), None)
            first = next((line for line in lines if died and died in line), "")
        else:
            died = None
        if died and names_engine:
            return ModelError(
                f"a vLLM engine for llm.model={cfg.model!r} died ({died}: "
                f"{first[:300]}). The engine's own error is in the worker log above "
                "(log_to_driver=true shows it) or under Ray's session logs "
                "(/tmp/ray/session_latest/logs). Usual causes: too little memory for weights "
                "+ KV cache (lower llm.vllm.gpu_memory_utilization or llm.vllm.max_model_len, "
                "or raise llm.vllm.tensor_parallel_size), a dtype the device lacks "
                "(llm.vllm.dtype), a model vLLM cannot run. Rows already written are kept: "
                "fix the setting and run the same command again to resume."
            )
        todo.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    return None


#: Exception lines that only wrap the engine's own error (skipped by :func:`root_cause`).
WRAPPERS = (
    "Engine core initialization failed",
    "See root cause above",
    "Traceback (most recent call last)",
    "RayTaskError",
    "ActorDiedError",
    "RayActorError",
    "DeploymentUnavailableError",
)
_RAISED = re.compile(r"(?<![\w.])((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception)): (\S.*)$")


def root_cause(text: str) -> str | None:
    """The engine's own error in ``text`` (a traceback, Serve's message, a worker log):
    the last exception line (``SomeError: message``) that is not one of the lines that
    only wrap it (:data:`WRAPPERS`), innermost first where one line nests several
    (``RuntimeError: ValueError: ...``), without its log prefix; None if there is none."""
    found = None
    for line in text.splitlines():
        line = line.strip()
        start = 0
        while (m := _RAISED.search(line, start)) is not None:
            start = m.start(2)
            if not any(w in m.group(0) for w in WRAPPERS) and not _RAISED.search(m.group(2)):
                found = f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2).strip()}"
    return found


def start_failure(cfg: LLMConfig, app: str, error: BaseException) -> ModelError:
    """What to do when the engines of ``app`` could not start (Serve gave up after
    ``engine_restarts + 1`` tries, or the deployment failed), with the engine's own error
    (:func:`root_cause`: Serve's message holds the constructor's traceback, and the
    replica adds what the engine logged, see raypipe.llm.vllm.server)."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0][:300] if lines else type(error).__name__
    cause = root_cause(text)
    tries = cfg.vllm.engine_restarts + 1
    tried = "once" if tries == 1 else f"{tries} times"
    if cause:
        own = f"The engine's own error: {cause[:500]}."
    else:
        own = (
            "The engine's own error is in the worker log above (log_to_driver=true shows it) "
            "or under Ray's session logs (/tmp/ray/session_latest/logs)."
        )
    if cause and "kv cache" in cause.lower():
        # vLLM reserves gpu_memory_utilization of the device for weights + KV cache.
        hint = (
            "The engine's share of memory does not hold its weights and KV cache: raise "
            "llm.vllm.gpu_memory_utilization (on CPU: the share of RAM), or lower "
            "llm.vllm.max_model_len, or use a smaller model."
        )
    else:
        hint = (
            "Usual causes: too little memory for weights + KV cache (llm.vllm."
            "gpu_memory_utilization, llm.vllm.max_model_len, llm.vllm.tensor_parallel_size), "
            "a dtype the device lacks (llm.vllm.dtype), no node with the engine's resources "
            "(llm.vllm.gpus_per_worker, resources, accelerator_type)."
        )
    return ModelError(
        f"the vLLM engines for llm.model={cfg.model!r} could not start (Serve application "
        f"{app!r}, tried {tried}: {first}). {own} {hint} Nothing was rendered for it: fix "
        "the setting and run again."
    )

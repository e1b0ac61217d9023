"""An engine that died or could not start, as a :class:`ModelError` that says what to do."""

from __future__ import annotations

from raypipe.config import LLMConfig
from raypipe.errors import ModelError
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


def start_failure(cfg: LLMConfig, app: str, error: BaseException) -> ModelError:
    """What to do when the engines of ``app`` could not start (Serve gave up after
    ``engine_restarts + 1`` tries, or the deployment failed)."""
    import re

    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = lines[0][:300] if lines else type(error).__name__
    # Serve's message holds the constructor's traceback: its last exception line says why.
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    if raised and raised[-1] not in detail:
        detail += " ... " + raised[-1][:300]
    tries = cfg.vllm.engine_restarts + 1
    tried = "once" if tries == 1 else f"{tries} times"
    return ModelError(
        f"the vLLM engines for llm.model={cfg.model!r} could not start (Serve application "
        f"{app!r}, tried {tried}: {detail}). The engine's own error "
        "is in the worker log above (log_to_driver=true shows it) or under Ray's session "
        "logs (/tmp/ray/session_latest/logs). Usual causes: too little memory for weights "
        "+ KV cache (lower llm.vllm.gpu_memory_utilization or llm.vllm.max_model_len, or "
        "raise llm.vllm.tensor_parallel_size), a dtype the device lacks (llm.vllm.dtype), "
        "no node with the engine's resources (llm.vllm.gpus_per_worker, resources, "
        "accelerator_type). Nothing was rendered for it: fix the setting and run again."
    )


# ---------------------------------------------------------------------------------------
# The engines (a Serve application) and the backend object
# ---------------------------------------------------------------------------------------

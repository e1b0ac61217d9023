"""The run's engines as one Serve application, started, found and stopped."""

from __future__ import annotations

import logging
import time
from typing import Any

from raypipe.config import LLMConfig
from raypipe.llm.vllm.failures import start_failure
from raypipe.llm.vllm.server import EngineServer
from raypipe.llm.vllm.settings import (
    DEPLOYMENT,
    deployment_options,
    engine_kwargs,
    model_path,
    service_name,
)

log = logging.getLogger(__name__)


class EngineService:
    """The run's engines: one Serve application (``min_engines..max_engines`` replicas of
    :class:`EngineServer`), shared by every writer of the run, the keyword banks and the
    on-demand requests of writers served from OUT/cache. Held by one Ray actor per run
    (or per :class:`VLLMBackend` used alone), so that whoever needs the engines first
    starts them, once, and nobody starts them when no request needs them.

    :meth:`ensure` starts the application, or uses the one already running under the same
    name (:func:`service_name`: same model, engine arguments and placement), left up by an
    earlier run (``llm.vllm.keep_engines``) or by a run that was killed: its resume uses
    them. :meth:`stop` deletes the application unless ``keep``, and says what it cost.
    """

    #: Seconds between looks at an application another run is still deploying.
    POLL_S = 1.0

    def __init__(self, llm: dict[str, Any]):
        self.cfg = LLMConfig.model_validate(llm)
        self.app = service_name(self.cfg)
        self.started = False  # by this service (False: found running)
        self.since: float | None = None
        self.held_s = 0.0
        self.replicas = 0
        self.used = False
        self.deleted = False

    def ensure(self) -> str:
        """The running application's name, started here if it was not running."""
        if self.since is not None:
            return self.app
        from ray import serve

        serve.start(proxy_location="Disabled")  # no HTTP: handles only
        status = self._status()
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            serve.delete(self.app)
            status = None
        if status is None:
            app = (
                serve.deployment(EngineServer)
                .options(**deployment_options(self.cfg))
                .bind(model_path(self.cfg), engine_kwargs(self.cfg))
            )
            try:
                serve.run(app, name=self.app, route_prefix=None)
            except Exception as e:  # noqa: BLE001 - Serve says RuntimeError; told apart here
                why = self._why()  # Serve's own error names only the deployment
                serve.delete(self.app)  # a failed application holds its resources
                raise start_failure(
                    self.cfg, self.app, RuntimeError(f"{e}\n{why}" if why else str(e))
                ) from None
            self.started = True
        else:
            while status == "DEPLOYING":  # another run is starting the same engines
                time.sleep(self.POLL_S)
                status = self._status()
            if status != "RUNNING":
                raise start_failure(self.cfg, self.app, RuntimeError(f"application {status}"))
        self.since = time.monotonic()
        self.used = True
        self.replicas = self._replicas()
        log.info("vLLM engines %s: %s", "started" if self.started else "found running", self.app)
        return self.app

    def _app(self):
        """Serve's status of the application, or None when it is not deployed."""
        from ray import serve

        return serve.status().applications.get(self.app)

    def _status(self) -> str | None:
        app = self._app()
        return None if app is None else str(getattr(app.status, "value", app.status))

    def _why(self) -> str:
        """What Serve says about the failed engine deployment: the constructor's
        traceback, whose last exception line is the engine's own error."""
        try:
            app = self._app()
        except Exception:  # noqa: BLE001 - only a better message is at stake
            return ""
        if app is None:
            return ""
        deployment = app.deployments.get(DEPLOYMENT)
        return "\n".join(m for m in (app.message, getattr(deployment, "message", "")) if m)

    def _replicas(self) -> int:
        app = self._app()
        if app is None or DEPLOYMENT not in app.deployments:
            return 0
        states = app.deployments[DEPLOYMENT].replica_states or {}
        return int(sum(n for state, n in states.items() if str(state).endswith("RUNNING")))

    def stop(self, keep: bool = False) -> dict[str, Any]:
        """Stop counting the engines' time, and delete the application unless ``keep``
        (it stays up for the next run); what the engines cost (:meth:`stats`)."""
        if self.since is not None:
            self.replicas = max(self.replicas, self._replicas())
            self.held_s += time.monotonic() - self.since
            self.since = None
        if self.used and not keep and not self.deleted:
            from ray import serve

            serve.delete(self.app)
            self.deleted = True
        return self.stats()

    def stats(self) -> dict[str, Any]:
        """``engines_started``: engines this service started (0: none, or found running);
        ``engine_s``: engine-seconds this run held (its time x the engines running)."""
        held = self.held_s + (time.monotonic() - self.since if self.since is not None else 0.0)
        engines = self.replicas or self.cfg.vllm.max_engines
        return {
            "app": self.app,
            "engines_started": engines if self.started else 0,
            "found_running": self.used and not self.started,
            "engine_s": held * engines if self.used else 0.0,
        }

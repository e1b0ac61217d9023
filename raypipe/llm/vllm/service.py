"""The run's engines as one Serve application: started, found, shared and stopped.

Several runs on one cluster with the same model and engine settings share one
application (its name is a hash of what it runs, :func:`service_name`). Each run holds
one :class:`EngineService` actor, made by :func:`start_service` and named
``<app>/<random>`` in the ``raypipe-engines`` namespace, so that every run can see who
else holds the same engines. The rules, from Serve's status of the application:

- not deployed, or ``DEPLOY_FAILED``: this run deploys it, and owns it;
- ``RUNNING``: used as found (another run's, one left up by ``llm.vllm.keep_engines``,
  or a killed run's, which its resume uses), never deleted by this run;
- ``DEPLOYING`` or ``UNHEALTHY`` (another run is starting it, or Serve is replacing an
  engine): waited for, at most ``llm.vllm.deploy_timeout_s``; never deleted.

At the end a run deletes the application only if it owns it (started it, or inherited
it), ``keep_engines`` is off, and no other live run is using it; when others are, it
hands ownership to them, and the last one to finish deletes it.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import ray

from raypipe.errors import ModelError
from raypipe.llm.config import LLMConfig
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

#: The namespace of the runs' EngineService actors (named ``<app>/<random>``).
USERS_NAMESPACE = "raypipe-engines"
#: Serve states of an application that is on its way to RUNNING (waited for).
TRANSIENT = ("DEPLOYING", "UNHEALTHY")
#: Seconds a run waits for another run's service to say whether it uses the engines.
PEER_TIMEOUT_S = 10.0
_now = time.monotonic
_sleep = time.sleep


def start_service(llm: LLMConfig, **options: Any):
    """The run's :class:`EngineService` actor (``options``: more Ray actor options), named
    so that other runs see it as a user of the same engines. It reserves nothing."""
    name = f"{service_name(llm)}/{uuid.uuid4().hex[:12]}"
    # Its own concurrency group answers other runs while ensure() waits on Serve.
    actor = ray.remote(concurrency_groups={"peers": 1})(EngineService)
    return actor.options(name=name, namespace=USERS_NAMESPACE, num_cpus=0, **options).remote(
        llm.model_dump(), name
    )


class EngineService:
    """The run's engines: one Serve application (``min_engines..max_engines`` replicas of
    :class:`EngineServer`), shared by every writer of the run, the keyword banks and the
    on-demand requests of writers served from OUT/cache. Held by one Ray actor per run
    (:func:`start_service`), so that whoever needs the engines first starts them, once,
    and nobody starts them when no request needs them.

    :meth:`ensure` starts the application or uses the one found under the same name
    (see the module docstring for the rules); :meth:`stop` deletes it when this run owns
    it and is its last user, unless ``keep``, and says what the engines cost.
    """

    #: Seconds between looks at an application another run is still deploying.
    POLL_S = 1.0

    def __init__(self, llm: dict[str, Any], name: str | None = None):
        self.cfg = LLMConfig.model_validate(llm)
        self.app = service_name(self.cfg)
        self.name = name  # this actor's name in USERS_NAMESPACE (None: not shared)
        self.started = False  # by this service (False: found running)
        self.owner = False  # deletes the application when it is the last user
        self.joining = False
        self.since: float | None = None
        self.held_s = 0.0
        self.replicas = 0
        self.used = False
        self.deleted = False

    # --- Serve, in one place each (tests replace these) ---------------------------------

    def _app(self):
        """Serve's status of the application, or None when it is not deployed."""
        from ray import serve

        return serve.status().applications.get(self.app)

    def _connect(self) -> None:
        from ray import serve

        serve.start(proxy_location="Disabled")  # no HTTP: handles only

    def _deploy(self) -> None:
        from ray import serve

        app = (
            serve.deployment(EngineServer)
            .options(**deployment_options(self.cfg))
            .bind(model_path(self.cfg), engine_kwargs(self.cfg))
        )
        serve.run(app, name=self.app, route_prefix=None)

    def _delete(self) -> None:
        from ray import serve

        serve.delete(self.app)

    def _peers(self) -> list:
        """The other runs' services of the same application (live or not)."""
        if self.name is None:
            return []
        prefix = self.app + "/"
        handles = []
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["namespace"] != USERS_NAMESPACE or actor["name"] == self.name:
                continue
            if actor["name"].startswith(prefix):
                try:
                    handles.append(ray.get_actor(actor["name"], namespace=USERS_NAMESPACE))
                except ValueError:  # gone since it was listed
                    continue
        return handles

    # --- start, find, wait ----------------------------------------------------------------

    def ensure(self) -> str:
        """The running application's name, started here if it was not deployed."""
        if self.since is not None:
            return self.app
        self.joining = True
        try:
            self._connect()
            status = self._status()
            if status == "DEPLOY_FAILED":  # nobody can use it: deployed again below
                self._delete()
                status = None
            if status in TRANSIENT:
                status = self._wait(status)
            if status is None:
                self._start()
            elif status != "RUNNING":
                raise start_failure(
                    self.cfg, self.app, RuntimeError(f"application {status}\n{self._why()}")
                )
        finally:
            self.joining = False
        self.since = _now()
        self.used = True
        self.replicas = self._replicas()
        log.info("vLLM engines %s: %s", "started" if self.started else "found running", self.app)
        return self.app

    def _start(self) -> None:
        try:
            self._deploy()
        except Exception as e:  # noqa: BLE001 - Serve says RuntimeError; told apart here
            why = self._why()  # Serve's own error names only the deployment
            self._delete()  # this run's failed application holds its resources
            raise start_failure(
                self.cfg, self.app, RuntimeError(f"{e}\n{why}" if why else str(e))
            ) from None
        self.started = self.owner = True

    def _wait(self, status: str) -> str | None:
        """Serve's status once the application is out of DEPLOYING/UNHEALTHY (another run
        is starting it, or Serve replaces an engine), waiting at most
        ``llm.vllm.deploy_timeout_s``; None if it was deleted meanwhile."""
        limit = self.cfg.vllm.deploy_timeout_s
        deadline = _now() + limit
        while status in TRANSIENT:
            if _now() >= deadline:
                raise ModelError(
                    f"the vLLM engines for llm.model={self.cfg.model!r} (Serve application "
                    f"{self.app!r}) are still {status} after {limit:.0f} s: another run on "
                    "this cluster is starting them, or Serve is replacing an engine. This "
                    "run left them alone. Run again when they are RUNNING (`serve status`), "
                    "or raise llm.vllm.deploy_timeout_s."
                )
            _sleep(self.POLL_S)
            status = self._status()
        return status

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

    # --- what other runs ask ------------------------------------------------------------

    @ray.method(concurrency_group="peers")
    def in_use(self) -> bool:
        """Whether this run uses the engines now (or is joining them)."""
        return self.joining or self.since is not None

    @ray.method(concurrency_group="peers")
    def inherit(self) -> None:
        """The owner left while this run used the engines: this run deletes them when it
        is the last user."""
        self.owner = True

    def _other_users(self) -> list:
        """The services of other live runs that use the engines now. One that does not
        answer in time counts as a user (it may be busy): deleting is what must not
        happen by mistake."""
        users = []
        for peer in self._peers():
            try:
                if ray.get(peer.in_use.remote(), timeout=PEER_TIMEOUT_S):
                    users.append(peer)
            except ray.exceptions.GetTimeoutError:
                users.append(peer)
            except ray.exceptions.RayActorError:  # that run has ended
                continue
        return users

    # --- stop -----------------------------------------------------------------------------

    def stop(self, keep: bool = False) -> dict[str, Any]:
        """Stop counting the engines' time; delete the application when this run owns it,
        is its last user and ``keep`` is off (else it stays up, and the log says why);
        what the engines cost (:meth:`stats`)."""
        if self.since is not None:
            self.replicas = max(self.replicas, self._replicas())
            self.held_s += _now() - self.since
            self.since = None
        if self.used and not keep and not self.deleted:
            self._release()
        return self.stats()

    def _release(self) -> None:
        if not self.owner:
            log.info(
                "vLLM engines %s were running when this run found them: left up "
                "(`serve delete %s` stops them)", self.app, self.app,
            )  # fmt: skip
            return
        heirs = self._hand_over(self._other_users())
        if heirs:
            log.info("vLLM engines %s: left up for %d other run(s)", self.app, heirs)
            return
        self._delete()
        self.deleted = True

    def _hand_over(self, others: list) -> int:
        """Make each other user an owner; returns how many took it."""
        return sum(self._handed(peer) for peer in others)

    def _handed(self, peer) -> bool:
        """Hand ownership to ``peer`` and wait for it to take it, so that when this run
        ends the others already own the engines. A peer that ended meanwhile is not an
        heir; one that does not answer in time is (it has the hand-over queued), as in
        :meth:`_other_users`."""
        try:
            ray.get(peer.inherit.remote(), timeout=PEER_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            pass
        except ray.exceptions.RayActorError:  # that run has ended
            return False
        return True

    def stats(self) -> dict[str, Any]:
        """``engines_started``: engines this service started (0: none, or found running);
        ``engine_s``: engine-seconds this run held (its time x the engines running)."""
        held = self.held_s + (_now() - self.since if self.since is not None else 0.0)
        engines = self.replicas or self.cfg.vllm.max_engines
        return {
            "app": self.app,
            "engines_started": engines if self.started else 0,
            "found_running": self.used and not self.started,
            "engine_s": held * engines if self.used else 0.0,
        }

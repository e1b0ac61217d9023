"""EngineService's rules for a Serve application of engines it finds, starts, waits for
and deletes (raypipe.llm.vllm.service), without vLLM or an engine: Serve is replaced by
a scripted status, the clock by a fake one. The last test checks how runs see each
other's services on a real local Ray."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

from raypipe.errors import ModelError
from raypipe.llm.config import LLMConfig
from raypipe.llm.vllm import service as service_module
from raypipe.llm.vllm.failures import root_cause, start_failure
from raypipe.llm.vllm.service import USERS_NAMESPACE, EngineService

#: A folder that passes for a saved model: the application's name only reads its path.
MODEL = Path(tempfile.mkdtemp(prefix="rp-vllm-service-"))
(MODEL / "config.json").write_text("{}")


def llm(**vllm) -> dict:
    return LLMConfig(backend="vllm", model=str(MODEL),
                     vllm={"gpus_per_worker": 0, **vllm}).model_dump()  # fmt: skip


class ScriptedServe(EngineService):
    """An EngineService whose Serve says, look by look, what ``statuses`` lists (the last
    one from then on), and which records what it deploys and deletes."""

    def __init__(self, statuses, users=(), **vllm):
        super().__init__(llm(**vllm), name="scripted")
        self.statuses = list(statuses)
        self.users = list(users)
        self.calls: list[str] = []

    def _connect(self):
        pass

    def _app(self):
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if status is None:
            return None
        return SimpleNamespace(status=status, deployments={}, message="")

    def _deploy(self):
        self.calls.append("deploy")
        self.statuses = ["RUNNING"]

    def _delete(self):
        self.calls.append("delete")
        self.statuses = [None]

    def _other_users(self):
        return self.users

    def _handed(self, peer):
        peer.inherit.remote()
        return True


@pytest.fixture
def clock(monkeypatch):
    """A fake clock: sleeping advances it, nothing waits."""
    now = SimpleNamespace(t=1000.0, slept=0.0)

    def sleep(s):
        now.t += s
        now.slept += s

    monkeypatch.setattr(service_module, "_now", lambda: now.t)
    monkeypatch.setattr(service_module, "_sleep", sleep)
    return now


def test_engines_found_running_are_used_and_never_deleted(clock):
    service = ScriptedServe(["RUNNING"])
    assert service.ensure() == service.app
    stats = service.stop(keep=False)
    assert service.calls == []  # neither deployed nor deleted
    assert stats["found_running"] and stats["engines_started"] == 0


def test_engines_a_run_started_are_deleted_when_it_is_the_last_user(clock):
    service = ScriptedServe([None])
    service.ensure()
    service.stop(keep=False)
    assert service.calls == ["deploy", "delete"]
    # keep_engines leaves them up even then.
    kept = ScriptedServe([None])
    kept.ensure()
    kept.stop(keep=True)
    assert kept.calls == ["deploy"]


class Peer:
    def __init__(self):
        self.inherited = 0
        self.inherit = SimpleNamespace(remote=self._inherit)

    def _inherit(self):
        self.inherited += 1


def test_engines_another_live_run_uses_are_handed_over_not_deleted(clock):
    peer = Peer()
    service = ScriptedServe([None], users=[peer])
    service.ensure()
    service.stop(keep=False)
    assert service.calls == ["deploy"] and peer.inherited == 1
    # The run that inherited them deletes them when it is the last user.
    heir = ScriptedServe(["RUNNING"])
    heir.ensure()
    heir.inherit()
    heir.stop(keep=False)
    assert heir.calls == ["delete"]


def test_unhealthy_engines_are_waited_for_not_deleted(clock):
    """UNHEALTHY is what Serve shows while it replaces a replica of another run's engines."""
    service = ScriptedServe(["UNHEALTHY", "UNHEALTHY", "UNHEALTHY", "RUNNING"])
    service.ensure()
    assert service.calls == [] and clock.slept == 3 * EngineService.POLL_S
    service.stop(keep=False)
    assert service.calls == []  # found, not started: left up


def test_deploying_engines_are_waited_for_at_most_the_deploy_timeout(clock):
    service = ScriptedServe(["DEPLOYING"], deploy_timeout_s=30)
    with pytest.raises(ModelError, match="llm.vllm.deploy_timeout_s") as info:
        service.ensure()
    assert "still DEPLOYING after 30 s" in str(info.value)
    assert 30 <= clock.slept <= 31
    assert service.calls == []  # another run's deploying engines: left alone


def test_engines_deleted_while_waited_for_are_started_by_this_run(clock):
    service = ScriptedServe(["DEPLOYING", "DEPLOYING", None])
    service.ensure()
    assert service.calls == ["deploy"] and service.owner


def test_a_failed_application_is_deployed_again():
    service = ScriptedServe(["DEPLOY_FAILED"])
    service.ensure()
    assert service.calls == ["delete", "deploy"] and service.owner


# --- the engine's own error in the run's message --------------------------------------

ENGINE_CORE_LOG = """\
(EngineCore_DP0 pid=51) INFO 12-06 10:58:01 [kv_cache_utils.py:1087] GPU KV cache size: 0
(EngineCore_DP0 pid=51) ERROR 12-06 10:58:01 [core.py:708] EngineCore failed to start.
(EngineCore_DP0 pid=51) ERROR 12-06 10:58:01 [core.py:708] Traceback (most recent call last):
(EngineCore_DP0 pid=51) ERROR 12-06 10:58:01 [core.py:708]   File "core.py", line 699, in run
(EngineCore_DP0 pid=51) ERROR 12-06 10:58:01 [core.py:708] ValueError: Available memory \
(-0.38 GiB) on kv cache allocation is less than requested memory for kv (1.18 GiB).
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        (ENGINE_CORE_LOG, "ValueError: Available memory (-0.38 GiB) on kv cache allocation "
                          "is less than requested memory for kv (1.18 GiB)."),
        ("Traceback ...\nray.exceptions.RayTaskError(RuntimeError): ray::ServeReplica\n"
         "RuntimeError: the vLLM engine could not start: torch.OutOfMemoryError: CUDA out "
         "of memory", "OutOfMemoryError: CUDA out of memory"),
        ("TypeError: AsyncEngineArgs.__init__() got an unexpected keyword argument 'x'",
         "TypeError: AsyncEngineArgs.__init__() got an unexpected keyword argument 'x'"),
        ("RuntimeError: Engine core initialization failed. See root cause above.", None),
        ("the deployment failed to start", None),
        ("RuntimeError: Traceback (most recent call last):", None),
    ],
)  # fmt: skip
def test_root_cause_is_the_engines_own_error_line(text, cause):
    assert root_cause(text) == cause


def test_start_failure_quotes_the_engines_kv_cache_error_and_says_what_to_change():
    cfg = LLMConfig.model_validate(llm(gpu_memory_utilization=0.05, engine_restarts=0))
    error = start_failure(
        cfg, "raypipe-vllm-x", RuntimeError("Deploying failed.\n" + ENGINE_CORE_LOG)
    )
    message = str(error)
    assert "could not start (Serve application 'raypipe-vllm-x', tried once" in message
    assert "The engine's own error: ValueError: Available memory (-0.38 GiB)" in message
    assert "raise llm.vllm.gpu_memory_utilization" in message and "run again" in message


# --- how runs see each other's services (a real local Ray) -----------------------------


class BusyPeer(EngineService):
    """Another run's service, in the middle of its run (using the engines)."""

    def in_use(self) -> bool:
        return True

    def is_owner(self) -> bool:
        return self.owner

    @ray.method(concurrency_group="peers")
    def inherit(self) -> None:
        time.sleep(0.5)  # busy: it takes the hand-over a moment after it is asked
        super().inherit()


def test_a_run_deletes_engines_only_once_other_live_runs_are_gone(ray_local, clock):
    ray = ray_local
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import it
    config = llm()
    me = EngineService(config, name=None)
    me.name = f"{me.app}/me"
    me.used = me.owner = True
    deleted = []
    me._delete = lambda: deleted.append(me.app)

    def peer(suffix):
        name = f"{me.app}/{suffix}"
        actor = ray.remote(concurrency_groups={"peers": 1})(BusyPeer)
        return actor.options(name=name, namespace=USERS_NAMESPACE, num_cpus=0).remote(config, name)

    other_app = (
        ray.remote(concurrency_groups={"peers": 1})(BusyPeer)
        .options(name="raypipe-vllm-other/x", namespace=USERS_NAMESPACE, num_cpus=0)
        .remote(config)
    )
    user = peer("user")
    ray.get(user.is_owner.remote())  # up
    me.stop(keep=False)
    assert deleted == [] and ray.get(user.is_owner.remote())  # handed over
    ray.kill(user)  # that run ends (killed, as a run's driver can be)
    me.stop(keep=False)
    assert deleted == [me.app]  # the engines of another app are no user of these
    ray.kill(other_app)

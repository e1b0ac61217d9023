"""cluster.yaml is what `ray up` accepts, and it is safe: checked against the installed Ray.

`ray up` first fills the file out with Ray's defaults and validates it against the
autoscaler's JSON schema (ray/autoscaler/ray-schema.json) before it contacts AWS; the
tests run those same steps, then check what the schema cannot: the dashboard (and the
Jobs API) bound to 127.0.0.1, no placeholder left, an instance profile on every node type,
and setup commands that install pinned versions of everything the jobs import.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster.yaml"
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
PLACEHOLDER = re.compile(
    r"REPLACE|CHANGE[_-]?ME|FILL[_-]?(ME|IN)|YOUR[_-]|TODO|FIXME|XXX|<[A-Za-z_ -]+>|\.\.\.",
    re.IGNORECASE,
)


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def strings(node, where="") -> list[tuple[str, str]]:
    """Every string value in the config, with its path."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(v, f"{where}.{k}".lstrip("."))]
    if isinstance(node, list):
        return [s for i, v in enumerate(node) for s in strings(v, f"{where}[{i}]")]
    return [(where, node)] if isinstance(node, str) else []


def commands(cluster: dict, key: str) -> list[str]:
    return list(cluster.get(key) or [])


def test_schema_of_the_installed_ray_accepts_it(cluster):
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in validator(schema).iter_errors(cluster)
    ]
    assert not errors, "cluster.yaml breaks Ray's autoscaler schema:\n" + "\n".join(errors)
    # What `ray up` does before it talks to AWS: fill in Ray's defaults, then validate.
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert set(prepared["available_node_types"]) == set(cluster["available_node_types"])
    assert prepared["head_node_type"] == "head"


def test_a_broken_file_is_refused_by_the_same_check(cluster):
    """The check above can fail: a typo'd field or a fractional GPU count is refused."""
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu_l4"]["max_worker"] = 8
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu_l4"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json.loads(SCHEMA.read_text()))


def test_dashboard_and_jobs_api_listen_on_loopback_only(cluster):
    head = " ".join(commands(cluster, "head_start_ray_commands"))
    start = [c for c in commands(cluster, "head_start_ray_commands") if "ray start" in c]
    assert len(start) == 1, "one `ray start --head` command expected"
    args = shlex.split(start[0].split("ray start", 1)[1])
    assert "--head" in args
    assert "--dashboard-host=127.0.0.1" in args, (
        "the head must bind the dashboard (and the unauthenticated Jobs API) to 127.0.0.1; "
        "`ray dashboard cluster.yaml` reaches it over SSH"
    )
    # `ray dashboard cluster.yaml` forwards port 8265 by default.
    assert "--dashboard-port=8265" in args
    everything = json.dumps(cluster)
    assert "0.0.0.0" not in everything, "nothing may listen on every interface"
    assert "dashboard-host" not in " ".join(commands(cluster, "worker_start_ray_commands"))
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head


def test_no_placeholders_and_images_that_resolve(cluster):
    found = [(where, s) for where, s in strings(cluster) if PLACEHOLDER.search(s)]
    assert not found, f"placeholders `ray up` would fail on: {found}"
    for name, node in cluster["available_node_types"].items():
        image = node["node_config"].get("ImageId")
        assert image, f"{name}: no ImageId makes Ray use its old Ubuntu 18.04 default AMI"
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", image) or image.startswith(
            "resolve:ssm:/aws/service/"
        ), f"{name}: ImageId {image!r} is neither an AMI id nor a public SSM parameter"
    image = cluster["docker"]["image"]
    tag = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", image)
    assert tag, f"docker image {image!r}: expected rayproject/ray:VERSION-pyXY-gpu (CUDA)"
    assert tag.group(1) == ray.__version__, (
        f"the cluster's Ray ({tag.group(1)}) must be the Ray the jobs are tested with "
        f"({ray.__version__}): `ray job submit` and the job drivers talk across versions"
    )
    python = Version(f"{tag.group(2)}.{tag.group(3)}")
    requires = SpecifierSet(project()["requires-python"])
    assert python in requires, f"image Python {python} is outside requires-python {requires}"


def test_every_node_type_has_an_instance_profile(cluster):
    profiles = {}
    for name, node in cluster["available_node_types"].items():
        profile = node["node_config"].get("IamInstanceProfile") or {}
        assert profile.get("Name") or profile.get("Arn"), (
            f"{name} has no IamInstanceProfile: Ray gives one to the head only, and a "
            "worker without one cannot write its Parquet parts to s3://"
        )
        profiles[name] = profile.get("Name") or profile.get("Arn")
    workers = {p for n, p in profiles.items() if n != cluster["head_node_type"]}
    # The workers' role grants S3, not EC2: it must not be the head's (launching) role.
    assert profiles[cluster["head_node_type"]] not in workers
    # And the file says how to create them.
    text = CLUSTER.read_text()
    for profile in profiles.values():
        assert profile in text.split("cluster_name:")[0], f"no instructions for {profile}"


def test_gpu_work_lands_on_gpu_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpu = [n for n, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert gpu and all(types[n]["min_workers"] == 0 for n in gpu), "GPU workers scale from 0"
    assert sum(types[n]["max_workers"] for n in gpu) <= cluster["max_workers"]


def project() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pip_installs(cluster: dict) -> list[Requirement]:
    reqs = []
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        for command in commands(cluster, key):
            for part in command.split(";"):
                words = shlex.split(part)
                if words[:2] != ["pip", "install"]:
                    assert "pip" not in words, f"unexpected pip command: {part!r}"
                    continue
                reqs += [Requirement(w) for w in words[2:] if not w.startswith("-")]
    return reqs


def test_setup_commands_pin_everything_the_jobs_import(cluster):
    reqs = pip_installs(cluster)
    assert reqs, "no pip install in the setup commands"
    unpinned = [str(r) for r in reqs if not (len(r.specifier) == 1 and "==" in str(r.specifier))]
    assert not unpinned, f"unpinned packages in the setup commands: {unpinned}"
    pinned = {r.name.lower().replace("_", "-"): r for r in reqs}
    meta = project()
    needed = list(meta["dependencies"])
    for extra in ("gen", "train", "eval"):
        needed += meta["optional-dependencies"][extra]
    for spec in map(Requirement, needed):
        name = spec.name.lower()
        assert name in pinned, f"{name} (pyproject.toml) is not installed on the nodes"
        pin = Version(str(pinned[name].specifier).lstrip("="))
        assert spec.specifier.contains(pin, prereleases=True), (
            f"{name}=={pin} on the nodes is outside pyproject.toml's {spec.specifier}"
        )
        assert set(spec.extras) <= set(pinned[name].extras), f"{name}: extras {spec.extras}"
    # The pins are scripts/constraints.txt's, which scripts/bootstrap.sh installs the
    # test environment under: move a pin in both places together.
    lines = (REPO / "scripts" / "constraints.txt").read_text().splitlines()
    constraints = {
        r.name.lower(): str(r.specifier)
        for r in (Requirement(x) for x in lines if x.strip() and not x.startswith("#"))
    }
    assert constraints, "scripts/constraints.txt pins nothing"
    differ = {
        n: (str(pinned[n].specifier) if n in pinned else None, c)
        for n, c in constraints.items()
        if n not in pinned or str(pinned[n].specifier) != c
    }
    assert not differ, f"cluster.yaml pins vs scripts/constraints.txt: {differ}"
    # And the environment these tests run in was installed under them (local version
    # labels such as torch's `+cpu` aside).
    drift = {}
    for name, req in pinned.items():
        try:
            here = Version(version(name)).base_version
        except PackageNotFoundError:
            continue
        if here != str(req.specifier).lstrip("="):
            drift[name] = (str(req.specifier), here)
    assert not drift, f"cluster.yaml pins differ from this environment: {drift}"

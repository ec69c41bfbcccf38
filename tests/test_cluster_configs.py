"""The files in cluster/: the launcher YAML passes Ray's own schema offline, the KubeRay
manifests parse with the fields KubeRay needs, and the service configs load. Every config keeps
Ray's token auth on (with the token provided) and the dashboard off public interfaces
(docs/user-guide.md, "Security")."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")  # a dependency of ray

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def test_launcher_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    expert = config["available_node_types"]["expert_node"]
    assert expert["resources"] == {"moeray_expert_node": 1}
    assert config["head_node_type"] in config["available_node_types"]
    # a stray field must be rejected, or the check above proves nothing
    config["not_a_ray_field"] = 1
    with pytest.raises(Exception, match="not_a_ray_field|Additional properties"):
        validate_config(prepare_config(config))


def test_kuberay_manifests():
    import ray

    cluster = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["spec"]["rayVersion"] == ray.__version__
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265}
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    assert json.loads(json.loads(workers["rayStartParams"]["resources"])) == {
        "moeray_expert_node": 1
    }
    assert ray.__version__ in workers["template"]["spec"]["containers"][0]["image"]

    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["moeray", "serve"]
    config_path = Path(entry[entry.index("--config") + 1])
    assert (CLUSTER.parent / config_path).is_file()
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])


def test_service_configs_load():
    from moeray.cli import _load_service_config

    for path in CLUSTER.glob("*.json"):
        config = _load_service_config(path)
        assert config.num_layers >= 1 and len(config.capacity) == config.num_layers


def _ray_start_commands(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\bray start\b", c)]


def _exports_token_mode(command: str) -> bool:
    """RAY_AUTH_MODE=token is in the environment of the command's `ray start`: exported
    earlier in the same shell line or given to it as an assignment."""
    before = command[: command.index("ray start")]
    return bool(re.search(r"(^|[\s;])(export\s+)?RAY_AUTH_MODE=token\b", before))


def test_launcher_keeps_token_auth_and_a_private_dashboard():
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    head = _ray_start_commands(config["head_start_ray_commands"])
    workers = _ray_start_commands(config["worker_start_ray_commands"])
    assert len(head) == 1 and len(workers) == 1
    for command in head + workers:
        assert _exports_token_mode(command), command
    # the token: one file of the cluster's own, at Ray's default path on every node
    mounts = config["file_mounts"]
    assert "~/.ray/auth_token" in mounts
    assert mounts["~/.ray/auth_token"] != "~/.ray/auth_token"  # not this machine's own token
    (start,) = head
    words = shlex.split(start.split(";")[-1])
    assert "--dashboard-host=127.0.0.1" in words, start
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "0.0.0.0" not in command
    # the check can fail: a start command without the mode is caught
    assert not _exports_token_mode("ulimit -n 65536; ray start --head")
    assert not _exports_token_mode("ray start --head; export RAY_AUTH_MODE=token")


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_kuberay_keeps_token_auth_and_a_cluster_internal_dashboard():
    cluster = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())
    spec = cluster["spec"]
    # the operator creates the token's Secret and sets RAY_AUTH_TOKEN on every container
    assert spec["authOptions"] == {"mode": "token"}
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for container in _containers(group):
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["RAY_AUTH_MODE"].get("value") == "token", container["name"]
            # a token, if named here, comes from a Secret, never written into the manifest
            assert "value" not in env.get("RAY_AUTH_TOKEN", {}), container["name"]
            assert all("hostPort" not in port for port in container.get("ports", []))
        assert not group["template"]["spec"].get("hostNetwork", False)
    # reachable inside the cluster only (the operator and RayJob submitters need it there)
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"

    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    # the job runs on that cluster (its auth), and turns nothing off
    assert "rayClusterSpec" not in job["spec"] and job["spec"]["clusterSelector"]
    env_vars = yaml.safe_load(job["spec"]["runtimeEnvYAML"]).get("env_vars", {})
    assert env_vars.get("RAY_AUTH_MODE", "token") == "token"


def test_no_config_turns_token_auth_off():
    for path in CLUSTER.iterdir():
        text = path.read_text()
        assert not re.search(r"RAY_AUTH_MODE\W+(value\W+)?disabled", text), path.name
    submit = (CLUSTER / "submit.sh").read_text()
    assert 'export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"' in submit

"""The files in cluster/: the launcher YAML passes Ray's own schema offline, the KubeRay
manifests parse with the fields KubeRay needs, and the service configs load."""

from __future__ import annotations

import copy
import json
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

"""The cluster manifests in cluster/ use the field names Ray and KubeRay read, and say what docs/cluster.md claims.

The `ray up` file is checked with Ray's own schema validator; the KubeRay manifests against the field names of
KubeRay's v1 API (ray-operator/apis/ray/v1/rayjob_types.go and raycluster_types.go), listed here, since an unknown
field is silently dropped by the API server and the cluster then runs without it."""
import os

import pytest
import yaml

CLUSTER = os.path.join(os.path.dirname(__file__), "..", "..", "cluster")

RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
               "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
               "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYCLUSTER_SPEC = {"upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
                   "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
                   "rayVersion", "workerGroupSpecs"}
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                      "upscalingMode", "version", "env", "envFrom", "volumeMounts"}


def load(name):
    with open(os.path.join(CLUSTER, name), encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def validate(config):
    """What `ray up` does before it starts anything: fill the provider's defaults, then check the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def unknown(mapping, known):
    return sorted(set(mapping) - known)


def check_cluster_spec(spec):
    assert unknown(spec, RAYCLUSTER_SPEC) == []
    assert unknown(spec["headGroupSpec"], HEAD_GROUP) == []
    assert unknown(spec.get("autoscalerOptions", {}), AUTOSCALER_OPTIONS) == []
    # the head runs the search's driver and never a trial
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # rayStartParams values are strings in KubeRay's API (map[string]string)
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        assert unknown(group, WORKER_GROUP) == []
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            if "nvidia.com/gpu" in container["resources"]["limits"]:
                gpu_groups.append(group["groupName"])
    assert gpu_groups, "a GPU worker group"
    mounts = {m["mountPath"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]
              for m in c.get("volumeMounts", [])}
    assert "/mnt/shared" in mounts, "results on a shared volume that outlives the cluster"


def test_rayjob_manifest():
    job = load("kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert unknown(spec, RAYJOB_SPEC) == []
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["entrypoint"].startswith("peft-search run ") and "--runs-dir /mnt/shared/" in spec["entrypoint"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])   # a YAML document inside a string
    assert runtime_env["env_vars"]["WANDB_MODE"] == "offline"
    check_cluster_spec(spec["rayClusterSpec"])


def test_raycluster_manifest():
    cluster = load("kuberay/raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    check_cluster_spec(cluster["spec"])
    ports = {p["containerPort"] for c in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
             for p in c["ports"]}
    assert 8265 in ports, "the dashboard port that `ray job submit` talks to"


def test_ray_up_config_passes_rays_schema():
    config = load("ray-cluster.aws.yaml")
    validate(config)   # raises on any field Ray does not know
    head = config["available_node_types"][config["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"], "the head must not be a spot instance"
    assert head["resources"] == {"CPU": 0}
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers)
    assert any("/mnt/shared" in command for command in config["setup_commands"])


def test_ray_up_schema_check_catches_a_misspelled_field():
    config = load("ray-cluster.aws.yaml")
    config["available_node_types"]["head"]["min_worker"] = 0
    with pytest.raises(Exception, match="min_worker"):
        validate(config)


def test_runtime_env_file_is_what_ray_accepts():
    from ray.runtime_env import RuntimeEnv

    runtime_env = RuntimeEnv(**load("runtime_env.yaml"))   # Ray validates pip/env_vars/excludes here
    packages = runtime_env["pip"]["packages"]
    assert any(p.startswith("peft") for p in packages) and any(p.startswith("optuna") for p in packages)
    assert not any(p.split(">")[0].split("=")[0] == "torch" for p in packages), \
        "torch comes with the image (a bare torch requirement pulls another multi-GB CUDA build)"

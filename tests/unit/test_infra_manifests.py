"""infra/: manifests parse, agree with each other and with the Dockerfile, and point at a real job spec."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
SPEC = "jobs/s3_example.toml"
KUBECTL_IMAGE_PREFIX = "bitnami/kubectl:"

YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path, kind: str) -> dict[str, Any]:
    docs = [d for d in _load_all(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def _image_from_dockerfile() -> str:
    m = re.search(r"docker build -f infra/Dockerfile -t (\S+) \.", (INFRA / "Dockerfile").read_text())
    assert m, "infra/Dockerfile header must show the build command with the image tag"
    return m.group(1)


def _dockerfile_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", (INFRA / "Dockerfile").read_text(), re.MULTILINE)
    assert m, f"infra/Dockerfile has no ARG {name}=..."
    return m.group(1)


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def _rayjob_specs() -> dict[str, dict[str, Any]]:
    """Every RayJob spec in infra/k8s, by where it lives."""
    specs = {"rayjob.yaml": _one(K8S / "rayjob.yaml", "RayJob")["spec"]}
    specs["raycronjob.yaml"] = _one(K8S / "raycronjob.yaml", "RayCronJob")["spec"]["jobTemplate"]
    cm = _one(K8S / "cronjob-rayjob.yaml", "ConfigMap")
    embedded = yaml.safe_load(cm["data"]["rayjob.yaml"])
    assert embedded["kind"] == "RayJob" and embedded["apiVersion"] == "ray.io/v1"
    specs["cronjob-rayjob.yaml"] = embedded["spec"]
    return specs


def test_yaml_files_found() -> None:
    names = {p.relative_to(INFRA).as_posix() for p in YAML_FILES}
    assert {"k8s/rayjob.yaml", "k8s/raycronjob.yaml", "k8s/cronjob-rayjob.yaml", "ray-cluster.yaml"} <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_yaml_parses(path: Path) -> None:
    docs = _load_all(path)
    assert docs
    if path.parent == K8S:
        for d in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(d), f"{path.name}: {d.get('kind')} lacks a header"


def test_image_is_the_same_everywhere() -> None:
    image = _image_from_dockerfile()
    assert f"IMAGE={image}" in (INFRA / "README.md").read_text()
    seen = []
    for spec in _rayjob_specs().values():
        cluster = spec["rayClusterSpec"]
        seen += [c["image"] for c in _containers(cluster["headGroupSpec"]["template"])]
        for group in cluster["workerGroupSpecs"]:
            seen += [c["image"] for c in _containers(group["template"])]
    seen.append(yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())["docker"]["image"])
    assert seen and set(seen) == {image}


def test_image_tag_is_package_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert _image_from_dockerfile().rsplit(":", 1)[1] == version


def test_ray_version_matches_image() -> None:
    ray_version = _dockerfile_arg("RAY_VERSION")
    for where, spec in _rayjob_specs().items():
        assert spec["rayClusterSpec"]["rayVersion"] == ray_version, where


def test_rayjob_specs_identical() -> None:
    specs = _rayjob_specs()
    reference = specs.pop("rayjob.yaml")
    for where, spec in specs.items():
        assert spec == reference, f"{where} drifted from rayjob.yaml"


def test_rayjob_fields() -> None:
    doc = _one(K8S / "rayjob.yaml", "RayJob")
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"]
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode")
    # Deletion rules may not be combined with the legacy shutdown fields (KubeRay validation).
    assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec
    rules = spec["deletionStrategy"]["deletionRules"]
    by = {(r["policy"], r["condition"].get("jobStatus") or r["condition"].get("jobDeploymentStatus")): r for r in rules}
    for status in ("SUCCEEDED", "FAILED"):
        # GPU workers go the moment the job ends; the CPU head after, for logs.
        assert by[("DeleteWorkers", status)]["condition"]["ttlSeconds"] == 0
        assert by[("DeleteCluster", status)]["condition"]["ttlSeconds"] > 0
    assert ("DeleteCluster", "Failed") in by  # a job that never ran is cleaned up too
    assert 0 < spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"]


def _entrypoint_args() -> list[str]:
    entry = _one(K8S / "rayjob.yaml", "RayJob")["spec"]["entrypoint"]
    run = [shlex.split(c) for c in entry.split("&&") if "drcr-pipeline" in c]
    assert len(run) == 1, entry
    return run[0]


def test_entrypoint_runs_the_cli_on_the_spec() -> None:
    entry = _one(K8S / "rayjob.yaml", "RayJob")["spec"]["entrypoint"]
    commands = [shlex.split(c) for c in entry.split("&&")]
    args = _entrypoint_args()
    assert args[:4] == ["drcr-pipeline", "run", "--spec", SPEC], entry
    for cmd in commands:
        if cmd[:1] == ["cd"]:
            # The spec path is relative to the image's WORKDIR.
            assert f"WORKDIR {cmd[1]}" in (INFRA / "Dockerfile").read_text()


def test_the_actor_pool_matches_the_gpu_worker_group() -> None:
    """ray.actors (ray.min_actors/max_actors once the pool is elastic) = the GPU group's bounds: one GPU
    per actor, the group autoscaled from 0, so no worker is ever started that no actor can use."""
    import os

    from pipeline.cli import _build_parser, effective_spec

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        spec = effective_spec(_build_parser().parse_args(_entrypoint_args()[1:]))
    finally:
        os.chdir(cwd)
    for where, job in _rayjob_specs().items():
        cluster = job["rayClusterSpec"]
        assert cluster["enableInTreeAutoscaling"] is True, where
        [gpu] = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"]
        assert gpu["minReplicas"] == gpu["replicas"] == 0, where
        assert gpu["maxReplicas"] == spec.ray.actors, where
        limits = _containers(gpu["template"])[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == 1 and spec.ray.num_gpus_per_actor in (-1, 1)


# Fields → the KubeRay release that introduced them (release notes / API reference of each release).
KUBERAY_FIELD_VERSIONS = {
    "backoffLimit": (1, 2, 0),
    "submitterConfig": (1, 2, 0),
    "deletionRules": (1, 5, 0),
    "preRunningDeadlineSeconds": (1, 6, 0),
    "RayCronJob": (1, 6, 0),
    "timeZone": (1, 7, 0),
}


def _stated_minimum(path: Path) -> tuple[int, ...]:
    m = re.search(r"Minimum KubeRay: (\d+)\.(\d+)\.(\d+)", path.read_text())
    assert m, f"{path.name} must state its minimum KubeRay version"
    return tuple(int(g) for g in m.groups())


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycronjob.yaml", "cronjob-rayjob.yaml"])
def test_each_manifest_states_its_true_minimum_kuberay_version(name: str) -> None:
    path = K8S / name
    text = path.read_text()
    if name == "cronjob-rayjob.yaml":  # KubeRay reads only the embedded RayJob (the CronJob is batch/v1)
        text = _one(path, "ConfigMap")["data"]["rayjob.yaml"]
    used = {f for f in KUBERAY_FIELD_VERSIONS if re.search(rf"\b{f}:", text)}
    if name == "raycronjob.yaml":
        used.add("RayCronJob")
        assert _one(path, "RayCronJob")["spec"]["timeZone"]
    assert {"backoffLimit", "submitterConfig", "deletionRules", "preRunningDeadlineSeconds"} <= used
    assert _stated_minimum(path) == max(KUBERAY_FIELD_VERSIONS[f] for f in used)


def test_the_cronjob_fallback_counts_only_truly_active_rayjobs(tmp_path: Path) -> None:
    """Run the CronJob's script with bash, a stand-in kubectl answering with RayJob states."""
    import os
    import subprocess

    script = _one(K8S / "cronjob-rayjob.yaml", "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"][
        "containers"
    ][0]["args"][0]
    log = tmp_path / "calls"
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(
        "#!/bin/bash\n"
        f'echo "$*" >> {log}\n'
        'if [ "$1 $2" = "get rayjobs" ] && [[ "$*" == *jsonpath* ]]; then printf "%b" "$STATES"; fi\n'
    )
    kubectl.chmod(0o755)

    def fire(states: list[str]) -> bool:
        log.write_text("")
        text = "".join(f"job-{i}={s}\n" for i, s in enumerate(states))
        env = os.environ | {"PATH": f"{tmp_path}:{os.environ['PATH']}", "STATES": text}
        subprocess.run(["bash", "-ceu", script], env=env, check=True, capture_output=True)
        return "create -f /manifests/rayjob.yaml" in log.read_text()

    assert fire([])
    assert fire(["Complete", "Failed", "ValidationFailed", "Suspended"])  # none of these blocks a firing
    for active in ("Running", "Initializing", "Waiting", "Retrying", ""):
        assert not fire(["Complete", active]), active


def test_job_spec_exists_and_parses() -> None:
    path = ROOT / SPEC
    assert path.exists(), f"{SPEC} (referenced by infra/k8s/*.yaml) is missing"
    data = tomllib.loads(path.read_text())
    assert data.get("inputs") and data.get("output")
    from pipeline.config import load_spec

    load_spec(path)


def test_gpu_workers_request_gpus() -> None:
    for where, spec in _rayjob_specs().items():
        cluster = spec["rayClusterSpec"]
        for c in _containers(cluster["headGroupSpec"]["template"]):
            assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}), f"{where}: GPU on the head"
        gpus = 0
        for group in cluster["workerGroupSpecs"]:
            assert group.get("minReplicas", 0) <= group.get("replicas", 0) <= group["maxReplicas"], where
            for c in _containers(group["template"]):
                limits = c["resources"]["limits"]
                gpus += int(limits.get("nvidia.com/gpu", 0))
                if "nvidia.com/gpu" in limits:
                    assert c["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        assert gpus >= 1, f"{where}: no worker group requests nvidia.com/gpu"
    launcher = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    worker_types = [t for n, t in launcher["available_node_types"].items() if n != launcher["head_node_type"]]
    assert any(
        t["node_config"]["InstanceType"].startswith(("g4dn", "g5", "g6", "p3", "p4", "p5")) for t in worker_types
    )


def test_no_literal_secrets_in_manifests() -> None:
    secret_names = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    for spec in _rayjob_specs().values():
        cluster = spec["rayClusterSpec"]
        templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
        for t in templates:
            for c in _containers(t):
                for env in c.get("env", []):
                    assert not (env["name"] in secret_names and "value" in env), env["name"]
                assert any("secretRef" in e for e in c.get("envFrom", [])), c["name"]
    for path in YAML_FILES:
        assert not re.search(r"AKIA[0-9A-Z]{16}", path.read_text()), path.name


# ------------------------------------------------------------------------------------------- cron


_CRON_BOUNDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def _valid_cron_field(field: str, lo: int, hi: int) -> bool:
    for item in field.split(","):
        base, _, step = item.partition("/")
        if step and (not step.isdigit() or int(step) < 1):
            return False
        if base == "*":
            continue
        start, _, end = base.partition("-")
        if not start.isdigit() or (end and not end.isdigit()):
            return False
        a, b = int(start), int(end or start)
        if not (lo <= a <= b <= hi):
            return False
    return True


def valid_cron(expr: str) -> bool:
    """Standard 5-field cron (minute hour day-of-month month day-of-week), numeric fields only."""
    fields = expr.split()
    return len(fields) == 5 and all(
        _valid_cron_field(f, lo, hi) for f, (lo, hi) in zip(fields, _CRON_BOUNDS, strict=True)
    )


@pytest.mark.parametrize(
    ("expr", "ok"),
    [("0 2 * * *", True), ("*/15 0-6 1,15 * 1-5", True), ("60 * * * *", False), ("* * *", False), ("a * * * *", False)],
)
def test_cron_validator(expr: str, ok: bool) -> None:
    assert valid_cron(expr) is ok


def test_schedules_valid_and_equal() -> None:
    ray_cron = _one(K8S / "raycronjob.yaml", "RayCronJob")
    k8s_cron = _one(K8S / "cronjob-rayjob.yaml", "CronJob")
    assert ray_cron["apiVersion"] == "ray.io/v1"
    assert k8s_cron["apiVersion"] == "batch/v1"
    assert valid_cron(ray_cron["spec"]["schedule"])
    assert valid_cron(k8s_cron["spec"]["schedule"])
    assert ray_cron["spec"]["schedule"] == k8s_cron["spec"]["schedule"]


def test_cronjob_rbac_wired() -> None:
    path = K8S / "cronjob-rayjob.yaml"
    sa = _one(path, "ServiceAccount")["metadata"]["name"]
    role = _one(path, "Role")
    binding = _one(path, "RoleBinding")
    cron = _one(path, "CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert {"kind": "ServiceAccount", "name": sa} in binding["subjects"]
    rules = [r for r in role["rules"] if "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"]]
    assert rules and {"create", "list", "delete"} <= set(rules[0]["verbs"])
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    # The manifest the CronJob creates is mounted from the ConfigMap and created with generateName.
    cm = _one(path, "ConfigMap")
    assert any(v.get("configMap", {}).get("name") == cm["metadata"]["name"] for v in pod["volumes"])
    assert "generateName" in yaml.safe_load(cm["data"]["rayjob.yaml"])["metadata"]
    script = pod["containers"][0]["args"][0]
    assert "kubectl create -f /manifests/rayjob.yaml" in script
    assert pod["containers"][0]["image"].startswith(KUBECTL_IMAGE_PREFIX)

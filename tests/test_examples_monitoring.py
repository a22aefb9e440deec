"""The monitoring kit in examples/ works on the sidecar's real metrics: Prometheus accepts the scrape
configs and the alert rules, the rules' unit tests pass, and every metric and label that an alert or
a Grafana panel queries is one a running sidecar exports. promtool is Debian's `prometheus` package
(.ci/run installs it); without it the promtool tests are skipped, and fail in CI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import yaml

from sidecar.shell.metrics import Metrics
from tests import upstreams as u
from tests.conftest import MakeSidecar
from tests.harness import missing, until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PROM = EXAMPLES / "prometheus"
ALERTS = PROM / "alerts.yaml"
DASHBOARD = EXAMPLES / "grafana" / "dashboards" / "model-sidecar.json"

# Made by Prometheus, not by the sidecar: the scrape's own series and the target's labels.
PROMETHEUS_MADE = {"up"}
TARGET_LABELS = {"job", "instance", "namespace", "pod"}
# Grafana's interval variables stand for a duration in a range; everything else is inside strings.
GRAFANA_DURATIONS = re.compile(r"\$__(rate_)?interval|\$__range")



def promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        missing("promtool is not installed (Debian's prometheus package; .ci/run installs it)")
    return tool


def run_promtool(*args: str | Path) -> str:
    proc = subprocess.run([promtool(), *map(str, args)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


# --- what a PromQL expression reads ------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"(\d+)"')
_TOKEN = re.compile(r"\d+(?:\.\d+)?[a-zA-Z]*|[A-Za-z_:][\w:]*(?:\s*\()?")
_KEYWORDS = {"bool", "and", "or", "unless", "offset", "inf", "nan", "by", "without", "on", "ignoring",
             "group_left", "group_right", "atan2"}


class Selector(NamedTuple):
    name: str
    labels: frozenset[str]            # label names its matchers use
    equals: tuple[tuple[str, str], ...] = ()   # label="value" matchers with a literal value


def selectors(expr: str) -> list[Selector]:
    """Each metric an expression reads, with its matchers (a rough PromQL lexer: strings are set aside,
    grouping clauses and ranges dropped, and a name followed by `(` is a function)."""
    strings: list[str] = []

    def set_aside(m: re.Match[str]) -> str:
        strings.append(m[0][1:-1])
        return f'"{len(strings) - 1}"'
    text = _STRING.sub(set_aside, GRAFANA_DURATIONS.sub("5m", expr))
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    found: list[Selector] = []

    def selector(m: re.Match[str]) -> str:
        matchers = _MATCHER.findall(m[2])
        if m[1] and not m[1].endswith("("):
            found.append(Selector(m[1], frozenset(label for label, _, _ in matchers),
                                  tuple((label, strings[int(i)]) for label, op, i in matchers
                                        if op == "=" and "$" not in strings[int(i)])))
        return " "
    text = _SELECTOR.sub(selector, text)
    for token in _TOKEN.findall(text):
        if token[0].isdigit() or token.endswith("(") or token in _KEYWORDS or token.startswith('"'):
            continue
        found.append(Selector(token, frozenset()))
    return found


def test_selector_lexer_finds_names_and_labels():
    """The lexer this file relies on finds a misspelt metric, a matcher's label and literal value, and not
    functions, grouping labels, durations or strings."""
    expr = ('sum by (route, le) (rate(sidecar_nope_total{code=~"5..", route=~"$route", x="y{z}"}[$__rate_interval])) '
            '/ on (route) group_left sum(up) > 0.5 * avg_over_time(sidecar_gauge[6h] offset 1h) or vector(0)')
    assert sorted(selectors(expr)) == [
        Selector("sidecar_gauge", frozenset()),
        Selector("sidecar_nope_total", frozenset({"code", "route", "x"}), (("x", "y{z}"),)),
        Selector("up", frozenset())]


def alert_exprs() -> dict[str, str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}


def dashboard() -> dict[str, Any]:
    d: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return d


def dashboard_exprs() -> dict[str, str]:
    """Every query of the dashboard by where it is: panel targets, annotations, variables."""
    d = dashboard()
    out = {f"panel {p['id']} {p['title']!r} {t['refId']}": t["expr"]
           for p in d["panels"] for t in p.get("targets", [])}
    out.update({f"annotation {a['name']!r}": a["expr"] for a in d["annotations"]["list"] if "expr" in a})
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v["query"]["query"])
            assert m, v["query"]
            out[f"variable {v['name']}"] = f"count by ({m[2]}) ({m[1]})"
    return out


# --- Prometheus --------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check():
    """`promtool check rules` accepts alerts.yaml, with every alert the kit promises."""
    out = run_promtool("check", "rules", ALERTS)
    assert "SUCCESS" in out
    promised = {"SidecarCircuitOpen", "SidecarDriftDetected", "SidecarHighErrorRate", "SidecarRolloutRolledBack",
                "SidecarRetryBudgetExhausted", "SidecarConfidenceDrop", "SidecarFeedbackAccuracyDrop"}
    assert promised <= set(alert_exprs())


def test_alert_rules_unit_tests_pass():
    """`promtool test rules` runs alerts_test.yaml: each alert fires on its bad series, with its text, and
    stays quiet before its `for` and on healthy neighbours."""
    tests = yaml.safe_load((PROM / "alerts_test.yaml").read_text())
    tested = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert tested == set(alert_exprs()), "every alert has a test in which it fires"
    assert "SUCCESS" in run_promtool("test", "rules", PROM / "alerts_test.yaml")


def test_prometheus_configs_pass_promtool_check(tmp_path: Path):
    """`promtool check config` accepts the compose scrape config, and the Kubernetes one with its pod
    discovery swapped for a static target (Debian's promtool is built without Kubernetes discovery);
    its relabelling reads the annotations the manifests set."""
    assert "SUCCESS" in run_promtool("check", "config", PROM / "prometheus.yaml")
    k8s = yaml.safe_load((EXAMPLES / "kubernetes" / "prometheus.yaml").read_text())
    (job,) = k8s["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    annotations = {f"__meta_kubernetes_pod_annotation_{k.replace('.', '_').replace('/', '_')}"
                   for path in (EXAMPLES / "kubernetes").rglob("sidecar*.yaml")
                   for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "Deployment"
                   for k in d["spec"]["template"]["metadata"].get("annotations", {})}
    read = {label for r in job["relabel_configs"] for label in r["source_labels"]
            if label.startswith("__meta_kubernetes_pod_annotation_")}
    assert read and read <= annotations, (read, annotations)
    job["static_configs"] = [{"targets": ["127.0.0.1:9901"]}]   # only checked, never scraped
    del job["kubernetes_sd_configs"]
    k8s["rule_files"] = [str(ALERTS)]
    (tmp_path / "prometheus.yaml").write_text(yaml.safe_dump(k8s))
    assert "SUCCESS" in run_promtool("check", "config", tmp_path / "prometheus.yaml")


# --- Grafana -----------------------------------------------------------------------------------


def test_dashboard_is_well_formed():
    """The dashboard loads as Grafana expects it: unique panel ids, every query on the datasource
    variable, panels inside the 24-column grid without overlapping."""
    d = dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    names = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "route", "instance"} <= names
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        taken = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not taken & cells, f"panel {p['title']!r} overlaps another"
        cells |= taken
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
            assert p["description"], f"panel {p['title']!r} says nothing of what it shows"


def test_dashboard_queries_are_valid_promql(tmp_path: Path):
    """Every panel, annotation and variable query parses as PromQL (promtool checks them as recording
    rules, Grafana's $__rate_interval read as 5m)."""
    rules = [{"record": f"dashboard:query_{i}", "expr": GRAFANA_DURATIONS.sub("5m", e)}
             for i, e in enumerate(dashboard_exprs().values())]
    (tmp_path / "dashboard_rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in run_promtool("check", "rules", tmp_path / "dashboard_rules.yaml")


# --- against a real sidecar --------------------------------------------------------------------


def every_feature(ups: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    """A config with every capability the metrics describe: a sticky split with a rollout, retries with
    a hedge, breakers, health checks, replicas with outlier ejection, fallback, a compared shadow,
    drift with a sample log, feedback with segments, a webhook, and a streaming route."""
    return {
        "state_dir": str(tmp_path / "state"),
        "backends": {
            "stable": {"url": ups["stable"], "health_check": {"path": "/health", "interval": "1s"},
                       "circuit_breaker": {"consecutive_failures": 5}},
            "canary": {"url": ups["canary"], "circuit_breaker": {"consecutive_failures": 5}},
            "shadow": {"url": ups["shadow"]},
            "ranker": {"endpoints": [ups["ranker1"], ups["ranker2"]], "outlier": {"consecutive_failures": 3}},
            "llm": {"url": ups["llm"]},
        },
        "routes": [
            {"name": "fraud", "match": {"path_prefix": "/v1/models/fraud"}, "split": {"stable": 50, "canary": 50},
             "sticky": {"header": "x-user-id"}, "override_header": "x-sidecar-backend", "timeout": "3s",
             "retry": {"attempts": 2, "hedge_after": "1s", "budget": 0.2},
             "fallback": [{"backend": "stable"}, {"response": {"status": 200, "json": {"predictions": []}}}],
             "mirror": [{"backend": "shadow", "percent": 100, "compare": {"path": "$.predictions[*]"}}],
             "monitor": {"sample": 1.0, "window": 100,
                         "features": {"amount": {"from": "request", "path": "$.instances[*].amount"},
                                      "country": {"from": "request", "path": "$.instances[*].country",
                                                  "kind": "categorical"},
                                      "score": {"from": "response", "path": "$.predictions[*]"}},
                         "reference": {"backend": "stable"},
                         "drift": {"min_samples": 5, "every": "1s"},
                         "log": {"path": str(tmp_path / "samples.jsonl")}},
             "feedback": {"path": "/v1/feedback", "prediction": {"path": "$.predictions[0]", "threshold": 0.5},
                          "segments": {"country": {"from": "request", "path": "$.instances[0].country",
                                                   "values": ["US", "DE"]}}},
             "rollout": {"canary": "canary", "baseline": "stable", "steps": [50, 100], "interval": "1m",
                         "gates": {"max_error_rate": 0.01, "compare": {"errors": "sequential"}},
                         "notify": {"webhook": ups["hook"]}}},
            {"name": "rank", "match": {"path_prefix": "/rank"}, "split": {"ranker": 1}},
            {"name": "chat", "match": {"path_prefix": "/v1/chat"}, "split": {"llm": 1}},
        ],
    }


def exposition(text: str) -> tuple[set[str], dict[str, set[frozenset[str]]], dict[tuple[str, str], set[str]]]:
    """The metric names a scrape offers (declared families and their samples), each sample name's label
    sets, and the values each (sample name, label) takes."""
    names: set[str] = set()
    labelsets: dict[str, set[frozenset[str]]] = {}
    values: dict[tuple[str, str], set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind_ = line.split()
            names.add(name)
            if kind_ == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            m = re.match(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s", line)
            assert m, line
            names.add(m[1])
            pairs = re.findall(r'(\w+)="([^"]*)"', m[2] or "")
            labelsets.setdefault(m[1], set()).add(frozenset(label for label, _ in pairs))
            for label, value in pairs:
                values.setdefault((m[1], label), set()).add(value)
    return names, labelsets, values


def declared_labels() -> dict[str, frozenset[str]]:
    """Label names of every sidecar family, as sidecar/shell/metrics.py declares them, by sample name."""
    out: dict[str, frozenset[str]] = {}
    for family in Metrics().families:
        labels = frozenset(family.labelnames)
        out[family.name] = labels
        if type(family).__name__ == "HistogramFamily":
            out[f"{family.name}_bucket"] = labels | {"le"}
            out[f"{family.name}_sum"] = out[f"{family.name}_count"] = labels
    return out


async def test_every_queried_metric_is_exported(upstreams, make_sidecar: MakeSidecar, tmp_path: Path):
    """Run a sidecar with every feature on, send it traffic and feedback, scrape /metrics: each metric an
    alert, panel, annotation or variable queries is there, with the labels its matchers name."""
    answers = {"stable": u.answer({"predictions": [0.9]}), "canary": u.answer({"predictions": [0.2]}),
               "shadow": u.answer({"predictions": [0.9]}), "ranker1": u.answer(), "ranker2": u.answer(),
               "llm": u.sse(['{"choices": [{"delta": {"content": "hi"}}]}', "[DONE]"], delay=0),
               "hook": u.answer({})}
    ups = {name: (await upstreams.start(b, name=name)).url for name, b in answers.items()}
    sc = await make_sidecar(every_feature(ups, tmp_path))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        ids = []
        for i in range(30):
            body = {"instances": [{"amount": 10.0 + i, "country": ["US", "DE", "FR"][i % 3]}]}
            async with client.post(sc.proxy_url + "/v1/models/fraud:predict", json=body,
                                   headers={"x-user-id": f"user{i}"}) as r:
                assert r.status == 200
                ids.append(r.headers["x-request-id"])
        for path in ("/rank", "/v1/chat/completions"):
            async with client.post(sc.proxy_url + path, json={}) as r:
                assert r.status == 200
                await r.read()
        async with client.post(sc.proxy_url + "/v1/feedback", json=[{"request_id": i, "label": 1} for i in ids]) as r:
            assert r.status == 200, await r.text()

        async def scrape() -> str:
            async with client.get(sc.admin_url + "/metrics") as r:
                assert r.status == 200
                return await r.text()

        async def settled() -> bool:   # the mirror, feedback and drift workers have published
            text = await scrape()
            return all(f"{name}{{" in text for name in ("sidecar_mirror_requests_total", "sidecar_feedback_metric",
                                                         "sidecar_drift_detected", "sidecar_feedback_score_mean"))
        await until(settled, 15, "mirror, feedback and drift samples in /metrics")
        names, labelsets, values = exposition(await scrape())

    declared = declared_labels()
    for sample, sets in labelsets.items():
        if sample in declared:
            assert sets == {declared[sample]}, f"{sample}: exported labels {sets}, declared {declared[sample]}"
    queries = {**{f"alert {k}": v for k, v in alert_exprs().items()}, **dashboard_exprs()}
    absent, bad_labels, bad_values = [], [], []
    for where, expr in queries.items():
        for sel in selectors(expr):
            if sel.name in PROMETHEUS_MADE:
                continue
            if sel.name not in names:
                absent.append(f"{where}: {sel.name}")
            elif unknown := sel.labels - declared.get(sel.name, frozenset()) - TARGET_LABELS:
                bad_labels.append(f"{where}: {sel.name} has no label {sorted(unknown)}")
            for label, value in sel.equals:
                seen = values.get((sel.name, label))
                if seen is not None and value not in seen:   # judged where this run exported the label
                    bad_values.append(f"{where}: {sel.name}{{{label}={value!r}}}: exported values {sorted(seen)}")
    assert not absent, "queried metrics the sidecar does not export:\n" + "\n".join(absent)
    assert not bad_labels, "\n".join(bad_labels)
    assert not bad_values, "\n".join(bad_values)
    queried = {sel.name for expr in queries.values() for sel in selectors(expr)}
    assert len(queried) >= 40, f"the lexer found only {len(queried)} metrics: it has stopped reading the queries"

"""The monitoring deploy files work with the daemon they monitor.

deploy/prometheus/ passes `promtool check config`, `check rules` and its own rule unit tests
(alerts.test.yml: every alert shown firing and not firing); the Grafana dashboard is valid for
provisioning and wired to the provisioned datasource and the compose services; and a live
`ingestd run` (real mosquitto and PostgreSQL) exports every metric, and every label, that the
dashboards and the alert rules use, each with a series from its first scrape: label values
known in advance (reasons, causes, kinds, inboxes, agents, task statuses and priorities) start
at 0. Every dashboard query parses as PromQL (promtool). No Prometheus or Grafana server runs
here.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agents.anomaly.rules import KINDS
from agents.metrics import EVENT_KINDS
from agents.reasons import REASONS
from db.rows import TASK_PRIORITIES, TASK_STATUSES
from db.writer import ERROR_KINDS
from edge.sparkplug import SKIP_REASONS
from tests.harness.daemon import INGESTD, Daemon, publish_all
from tests.harness.servers import Mosquitto, unique_name, wait_until

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts.test.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "ingestd.json"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "ingestd.yml"
COMPOSE = ROOT / "docker-compose.yml"

# The one family the dashboards and alerts use that cannot have a series before traffic: its
# label is a device id, unknowable in advance (the daemon declares it, HELP/TYPE, empty).
NO_SERIES_BEFORE_TRAFFIC = {"ingestd_device_last_seen_timestamp_seconds"}
# Label values known in advance: each has a series, at 0, from the first scrape. Anomaly
# detection is on by default: its agents and inboxes are there too.
AGENTS = {"validation", "enrichment", "persistence", "publisher", "anomaly", "maintenance"}
INBOXES = {"validation", "enrichment", "persistence", "publisher", "anomaly", "maintenance"}
SPARKPLUG_STATES = {"online", "offline"}
KNOWN_LABEL_VALUES: list[tuple[str, str, set[str]]] = [  # (family, label, values)
    ("ingestd_messages_rejected", "reason", set(REASONS)),
    ("ingestd_mqtt_disconnects", "cause", {"connect_failed", "lost"}),
    ("ingestd_events_published", "kind", set(EVENT_KINDS)),
    ("ingestd_events_dropped", "kind", set(EVENT_KINDS)),
    ("ingestd_database_errors", "kind", set(ERROR_KINDS)),
    ("ingestd_queue_depth", "inbox", INBOXES),
    ("ingestd_queue_capacity", "inbox", INBOXES),
    ("ingestd_queue_full_waits", "inbox", INBOXES),
    ("ingestd_agent_up", "agent", AGENTS),
    ("ingestd_agent_restarts", "agent", AGENTS),
    # The connection without Sparkplug sources: only the main one exists.
    ("ingestd_mqtt_connected", "connection", {"main"}),
    ("ingestd_mqtt_connects", "connection", {"main"}),
    # Declared whether or not a Sparkplug source is configured.
    ("ingestd_sparkplug_metrics_skipped", "reason", {*SKIP_REASONS, "definition"}),
    ("ingestd_sparkplug_edge_nodes", "state", SPARKPLUG_STATES),
    ("ingestd_sparkplug_devices", "state", SPARKPLUG_STATES),
    # Anomaly detection and maintenance tasks.
    ("ingestd_anomaly_alerts", "kind", set(KINDS)),
    ("ingestd_anomaly_alerts_closed", "kind", set(KINDS)),
    ("ingestd_anomaly_readings_skipped", "cause", {"queue", "budget"}),
    ("ingestd_maintenance_tasks", "status", set(TASK_STATUSES)),
    ("ingestd_maintenance_tasks", "priority", set(TASK_PRIORITIES)),
]
# Families a healthy daemon, idle on a fresh database, holds at 0 in every series.
ZERO_WHEN_IDLE = (
    "ingestd_messages_rejected",
    "ingestd_mqtt_disconnects",
    "ingestd_events_published",
    "ingestd_events_dropped",
    "ingestd_database_errors",
    "ingestd_queue_full_waits",
    "ingestd_agent_restarts",
    "ingestd_sparkplug_metrics_skipped",
    "ingestd_sparkplug_edge_nodes",
    "ingestd_sparkplug_devices",
    "ingestd_anomaly_alerts",
    "ingestd_anomaly_alerts_closed",
    "ingestd_anomaly_readings_skipped",
    "ingestd_anomaly_series_evicted",
    "ingestd_anomaly_snapshot_errors",
    "ingestd_maintenance_tasks",
)
# Labels Prometheus adds to every scraped series, and the bucket label of histograms.
TARGET_LABELS = {"job", "instance"}

METRIC = re.compile(r"(?<![\w:])ingestd_[a-z0-9_]+(?![\w:])")
BY_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*\"")
SELECTOR = re.compile(r"\{([^{}]*)\}")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
ALERT_LABEL = re.compile(r"\$labels\.(\w+)")
SERIES_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


# ================================================================ extraction helpers


def metric_names(text: str) -> set[str]:
    """Every ingestd_* identifier in a PromQL expression (or runbook text)."""
    return set(METRIC.findall(text))


def label_names(expr: str) -> set[str]:
    """Label names an expression selects on or aggregates by."""
    names: set[str] = set()
    for group in BY_CLAUSE.findall(expr):
        names.update(part.strip() for part in group.split(",") if part.strip())
    for selector in SELECTOR.findall(expr):
        names.update(MATCHER.findall(selector))
    return names


@dataclass
class Family:
    kind: str
    labels: set[str] = field(default_factory=set)
    samples: int = 0
    values: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> value -> sum


@dataclass
class Exported:
    """What one scrape of /metrics offers: series name -> its family (name, kind, labels)."""

    families: dict[str, Family]
    series: dict[str, str]
    totals: dict[str, float]  # series name -> sum over its samples

    @classmethod
    def parse(cls, text: str) -> Exported:
        families: dict[str, Family] = {}
        series: dict[str, str] = {}
        totals: dict[str, float] = {}
        for metric in text_string_to_metric_families(text):
            family = families.setdefault(metric.name, Family(metric.type))
            for suffix in SERIES_SUFFIXES[metric.type]:
                series[metric.name + suffix] = metric.name
            for sample in metric.samples:
                if sample.name.endswith("_created"):
                    continue
                series.setdefault(sample.name, metric.name)
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
                family.samples += 1
                family.labels.update(sample.labels)
                for label, value in sample.labels.items():
                    sums = family.values.setdefault(label, {})
                    sums[value] = sums.get(value, 0.0) + sample.value
        return cls(families, series, totals)

    def problems(self, names: set[str], without_series: frozenset[str] = frozenset()) -> list[str]:
        """Why some of ``names`` are not usable: not exported, or no series (unless their
        family is in ``without_series``)."""
        found = []
        for name in sorted(names):
            family = self.series.get(name)
            if family is None:
                found.append(f"{name}: not exported")
            elif self.families[family].samples == 0 and family not in without_series:
                found.append(f"{name}: declared but no series ({family})")
        return found

    def labels_of(self, names: set[str]) -> set[str] | None:
        """Labels the series of ``names`` can carry; None when one has no samples to tell."""
        labels = set(TARGET_LABELS)
        for name in names:
            family = self.families[self.series[name]]
            if family.samples == 0:
                return None
            labels |= family.labels | ({"le"} if family.kind == "histogram" else set())
        return labels


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(where, expr, legend) for every panel target and every query variable."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                where = f"panel {panel.get('title')!r} target {target.get('refId')}"
                yield where, target.get("expr", ""), target.get("legendFormat", "")
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard["panels"])
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            expr = query.get("query", "") if isinstance(query, dict) else str(query or "")
            yield f"variable {variable['name']!r}", expr, ""


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def load_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def test_extractors_read_promql() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le) (rate(ingestd_write_duration_seconds_bucket"
        '{job="ingestd", instance=~"$instance"}[5m]))) / on(instance) ingestd_inflight_window'
    )
    assert metric_names(expr) == {
        "ingestd_write_duration_seconds_bucket",
        "ingestd_inflight_window",
    }
    assert label_names(expr) == {"le", "job", "instance"}
    assert metric_names('up{job="ingestd"} + foo_ingestd_x + ingestd:recorded') == set()
    text = (
        "# HELP ingestd_x_total x\n# TYPE ingestd_x_total counter\n"
        '# HELP ingestd_h h\n# TYPE ingestd_h histogram\ningestd_h_bucket{le="1.0"} 1.0\n'
        "ingestd_h_count 1.0\ningestd_h_sum 0.5\n"
    )
    exported = Exported.parse(text)
    assert exported.problems({"ingestd_h_bucket", "ingestd_h_sum"}) == []
    assert exported.problems({"ingestd_x_total", "ingestd_h", "ingestd_y"}) == [
        "ingestd_h: not exported",
        "ingestd_x_total: declared but no series (ingestd_x)",
        "ingestd_y: not exported",
    ]
    assert exported.problems({"ingestd_x_total"}, frozenset({"ingestd_x"})) == []
    assert exported.labels_of({"ingestd_h_bucket"}) == {"job", "instance", "le"}
    assert exported.families["ingestd_h"].values == {"le": {"1.0": 1.0}}


# ================================================================ promtool


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:  # pragma: no cover - make test installs it (scripts/ensure-binaries.sh)
        pytest.skip("promtool is not installed: run scripts/ensure-binaries.sh (prometheus)")
    # From the config's directory, as Prometheus resolves rule_files relative to it anyway.
    return subprocess.run(
        [binary, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.timeout(30)
def test_prometheus_config_passes_promtool() -> None:
    result = promtool("check", "config", PROMETHEUS_CONFIG.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout  # rule_files resolved, alerts.yml loaded


@pytest.mark.timeout(30)
def test_alert_rules_pass_promtool() -> None:
    result = promtool("check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(alert_rules())} rules found" in result.stdout


@pytest.mark.timeout(30)
def test_alert_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", ALERT_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.timeout(10)
def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(ALERT_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert fires == names
    assert quiet == names


@pytest.mark.timeout(10)
def test_alerts_carry_severity_duration_and_a_runbook() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == {
        "IngestdDown",
        "IngestdNotReady",
        "IngestdSpoolGrowing",
        "IngestdSpoolOld",
        "IngestdRejectionRatioHigh",
        "IngestdDeviceSilent",
        "IngestdSparkplugNodesOffline",
        "IngestdHighPriorityTaskOpen",
        "IngestdAnomalyDetectionSkipping",
    }
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{rule['alert']}: no for:"
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert len(rule["annotations"]["description"]) > 80, f"{rule['alert']}: no runbook"
        assert 'job="ingestd"' in rule["expr"], f"{rule['alert']}: select the ingestd job"


# ================================================================ Grafana and compose wiring


@pytest.mark.timeout(10)
def test_dashboard_is_valid_for_provisioning() -> None:
    dashboard = load_json(DASHBOARD)
    assert dashboard["uid"] == "ingestd-overview"  # stable: links and bookmarks keep working
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36  # Grafana 9+; 10/11/12 migrate it on load
    assert dashboard.get("id") is None  # provisioning assigns the id
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 20
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    provisioned = load_yaml(DATASOURCES)["datasources"]
    assert variables["datasource"]["current"]["value"] == provisioned[0]["uid"]
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel["targets"], f"{title}: no targets"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"{title}: duplicate refId"
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], title
            assert target["expr"].strip(), f"{title}: empty expr"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, title
        assert grid["h"] > 0, title
        assert panel.get("description"), f"{title}: say what the panel shows"


@pytest.mark.timeout(10)
def test_dashboard_covers_what_operators_watch() -> None:
    used = set()
    for _, expr, _ in dashboard_queries(load_json(DASHBOARD)):
        used |= metric_names(expr)
    must = {
        "ingestd_messages_received_total",  # throughput
        "ingestd_readings_stored_total",
        "ingestd_readings_duplicate_total",
        "ingestd_messages_rejected_total",  # rejections by reason
        "ingestd_end_to_end_latency_seconds_bucket",
        "ingestd_write_duration_seconds_bucket",
        "ingestd_queue_depth",
        "ingestd_inflight_messages",
        "ingestd_inflight_window",
        "ingestd_intake_paused",
        "ingestd_spool_bytes",
        "ingestd_spool_readings",
        "ingestd_spool_oldest_age_seconds",
        "ingestd_spool_full",
        "ingestd_mqtt_connected",
        "ingestd_database_up",
        "ingestd_mqtt_connects_total",
        "ingestd_mqtt_disconnects_total",
        "ingestd_device_last_seen_timestamp_seconds",
        "ingestd_agent_up",
        "ingestd_agent_restarts_total",
        "ingestd_events_published_total",
        "ingestd_events_dropped_total",
        "ingestd_sparkplug_edge_nodes",  # the Sparkplug row
        "ingestd_sparkplug_devices",
        "ingestd_sparkplug_seq_errors_total",
        "ingestd_sparkplug_rebirth_requests_total",
        "ingestd_sparkplug_metrics_skipped_total",
        "ingestd_sparkplug_stale_deaths_total",
        "ingestd_anomaly_alerts_total",  # the anomalies & maintenance row
        "ingestd_anomaly_alerts_closed_total",
        "ingestd_maintenance_tasks",
        "ingestd_anomaly_series",
        "ingestd_anomaly_series_evicted_total",
        "ingestd_anomaly_readings_skipped_total",
        "ingestd_anomaly_readings_judged_total",
        "ingestd_anomaly_detector_seconds_bucket",
        "ingestd_anomaly_detector_seconds_sum",
        "ingestd_anomaly_detector_seconds_count",
    }
    assert must <= used, f"dashboard lost {sorted(must - used)}"


# Grafana's own variables, as Prometheus would see them once Grafana has filled them in.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
DASHBOARD_VARIABLE = re.compile(r"\$\{?\w+\}?")


def as_promql(expr: str) -> str:
    """A dashboard query as Prometheus receives it: Grafana's variables filled in, the
    dashboard's own (used as regex matchers, e.g. instance=~"$instance") matching anything."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return DASHBOARD_VARIABLE.sub(".+", expr)


@pytest.mark.timeout(30)
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every panel and variable query is valid PromQL: promtool parses each one as the
    expression of a recording rule (label_values() is Grafana's, not PromQL: left out)."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": as_promql(expr), "labels": {"at": where}}
        for path in DASHBOARDS
        for i, (where, expr, _) in enumerate(dashboard_queries(load_json(path)))
        if not expr.startswith("label_values(")
    ]
    assert rules
    checked = tmp_path / "dashboard-queries.yml"
    checked.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(checked))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (or volume name) of a compose service."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


@pytest.mark.timeout(10)
def test_compose_wires_prometheus_and_grafana_to_the_deploy_files() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert _mounts(prometheus)["/etc/prometheus"] == "./deploy/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    # prometheus.yml scrapes the ingestd service on the port it listens on in compose.
    listen = services["ingestd"]["environment"]["INGESTD_METRICS__LISTEN"]
    config = load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = jobs["ingestd"]["static_configs"][0]["targets"]
    assert targets == [f"ingestd:{listen.rpartition(':')[2]}"]
    assert config["rule_files"] == [ALERTS.name]
    # Grafana: provisioning and dashboards mounted where the provider looks.
    mounts = _mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    provider = load_yaml(DASHBOARD_PROVIDERS)["providers"][0]
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    assert provider["type"] == "file"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    datasource = load_yaml(DATASOURCES)["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]
    for name in ("prometheus-data", "grafana-data"):
        assert name in compose["volumes"]
    # Unauthenticated UIs: published on this host only.
    for service in (prometheus, grafana):
        assert all(port.startswith("127.0.0.1:") for port in service["ports"])


# ================================================================ against a live daemon


def _migrate(url: str) -> None:
    result = subprocess.run(
        [str(INGESTD), "migrate"],
        env={"INGESTD_DATABASE__URL": url, "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def _traffic(prefix: str) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """Good readings from two devices and two kinds of bad messages, so the series only
    traffic creates (a device id's) exist and labelled counters move: (good, bad)."""
    good = [
        (f"sensors/{prefix}-{device}/temp", b'{"value": %d, "ts": %d}' % (i, 1_790_000_000 + i))
        for device in ("a", "b")
        for i in range(3)
    ]
    bad = [
        (f"sensors/{prefix}-a/temp", b"{not json"),
        (f"sensors/{prefix}-b/temp", b'{"value": "hot"}'),
    ]
    return good, bad


@pytest.fixture
def live_daemon(tmp_path: Path, mosquitto: Mosquitto, pg_url: str) -> Iterator[Daemon]:
    """`ingestd run` on PostgreSQL (the compose setup: spool, drainer and their metrics live),
    started and ready; nothing published yet."""
    _migrate(pg_url)
    daemon = Daemon(
        tmp_path / "daemon",
        {
            "INGESTD_MQTT__URL": mosquitto.url,
            "INGESTD_MQTT__CLIENT_ID": unique_name("ingestd-monitoring-"),
            "INGESTD_DATABASE__URL": pg_url,
        },
    )
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


def _used_by_alerts() -> list[tuple[str, str, set[str]]]:
    """(alert, text with metric names, labels used) per alert rule."""
    found = []
    for rule in alert_rules():
        notes = " ".join(rule["annotations"].values())
        labels = label_names(rule["expr"]) | set(ALERT_LABEL.findall(notes))
        found.append((rule["alert"], f"{rule['expr']} {notes}", labels))
    return found


def _uses() -> list[tuple[str, set[str], set[str]]]:
    """(where, metric names, labels) for every dashboard query and every alert rule."""
    uses: list[tuple[str, set[str], set[str]]] = [
        (
            f"{path.name} {where}",
            metric_names(expr),
            label_names(expr) | set(LEGEND_LABEL.findall(legend)),
        )
        for path in DASHBOARDS
        for where, expr, legend in dashboard_queries(load_json(path))
    ]
    uses += [(f"alert {a}", metric_names(text), labels) for a, text, labels in _used_by_alerts()]
    return uses


def _scrape(daemon: Daemon) -> Exported:
    status, text = daemon.http("/metrics")
    assert status == 200, f"/metrics answered {status}"
    return Exported.parse(text)


def _wrong_labels(exported: Exported, uses: list[tuple[str, set[str], set[str]]]) -> list[str]:
    """Uses that select or split by a label their series do not carry (uses whose series
    cannot tell yet, having none, are left out)."""
    wrong = []
    for where, names, labels in uses:
        known = exported.labels_of(names)
        if known is not None and not labels <= known:
            wrong.append(f"{where}: {sorted(labels - known)} not on {sorted(names)}")
    return wrong


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_dashboard_and_alert_metrics_have_series_from_the_first_scrape(
    live_daemon: Daemon, mosquitto: Mosquitto
) -> None:
    uses = _uses()
    assert len(DASHBOARDS) >= 1
    wanted = set().union(*(names for _, names, _ in uses))
    # Explicit, so a rename on either side fails here: the per-device staleness gauge and the
    # readiness gauge the alerts and the dashboard are built on.
    assert {"ingestd_device_last_seen_timestamp_seconds", "ingestd_ready"} <= wanted
    # The one exemption, by name: a device id is not known before the device sends.
    assert {"ingestd_device_last_seen_timestamp_seconds"} == NO_SERIES_BEFORE_TRAFFIC

    # One scrape of the ready daemon, before any message is published.
    first = _scrape(live_daemon)
    assert first.totals["ingestd_messages_received_total"] == 0, "traffic before the scrape"
    assert first.totals["ingestd_ready"] == 1

    problems = [
        f"{where}: {problem}"
        for where, names, _ in uses
        for problem in first.problems(names, frozenset(NO_SERIES_BEFORE_TRAFFIC))
    ]
    assert not problems, "metrics without a series on the first scrape:\n" + "\n".join(problems)
    for family in NO_SERIES_BEFORE_TRAFFIC:  # declared all the same: HELP and TYPE, no samples
        assert first.families[family].samples == 0, family
    wrong_labels = _wrong_labels(first, uses)
    assert not wrong_labels, "labels the daemon's series do not carry:\n" + "\n".join(wrong_labels)

    # Label values known in advance: every one has its series, and a healthy daemon's is 0.
    missing = []
    for family, label, values in KNOWN_LABEL_VALUES:
        found = first.families[family].values.get(label, {})
        missing += [f"{family}{{{label}={v!r}}}" for v in sorted(values - found.keys())]
    assert not missing, "series missing on the first scrape:\n" + "\n".join(missing)
    for family in ZERO_WHEN_IDLE:
        assert first.families[family].samples, f"{family}: no series to tell"
        nonzero = {
            f"{label}={value}": n
            for label, sums in first.families[family].values.items()
            for value, n in sums.items()
            if n
        }
        total = sum(n for name, n in first.totals.items() if first.series.get(name) == family)
        assert not nonzero, f"{family} on a healthy, idle daemon: {nonzero}"
        assert total == 0, f"{family} on a healthy, idle daemon: {total}"
    agents_up = first.families["ingestd_agent_up"].values["agent"]
    assert {agent: agents_up[agent] for agent in AGENTS} == dict.fromkeys(AGENTS, 1.0)

    # Then traffic: the per-device series appear, with the labels the panels and alerts use,
    # and the detectors judge the good readings (off the acknowledgement path, so waited for).
    good_traffic, bad_traffic = _traffic(unique_name("dev"))
    traffic, good = good_traffic + bad_traffic, len(good_traffic)
    publish_all(mosquitto.port, traffic)
    scrape: dict[str, Exported] = {}

    def settled() -> bool:
        scrape["last"] = exported = _scrape(live_daemon)
        return (
            exported.totals.get("ingestd_messages_received_total", 0) >= len(traffic)
            and exported.totals.get("ingestd_inflight_messages") == 0
            and exported.families["ingestd_device_last_seen_timestamp_seconds"].samples >= 2
            and exported.totals.get("ingestd_anomaly_readings_judged_total", 0) >= good
        )

    with contextlib.suppress(TimeoutError):
        wait_until(settled, 20, interval=0.1)
    exported = scrape["last"]
    problems = [f"{where}: {p}" for where, names, _ in uses for p in exported.problems(names)]
    assert not problems, "metrics without a series after traffic:\n" + "\n".join(problems)
    wrong_labels = _wrong_labels(exported, uses)
    assert not wrong_labels, "labels the daemon's series do not carry:\n" + "\n".join(wrong_labels)
    last_seen = exported.families["ingestd_device_last_seen_timestamp_seconds"]
    assert last_seen.kind == "gauge"
    assert last_seen.samples == 2  # the two devices that sent good readings
    rejected = exported.families["ingestd_messages_rejected"].values["reason"]
    assert sum(rejected.values()) == 2
    assert set(rejected) == set(REASONS)  # no reason outside the known ones
    # Every good reading judged (none skipped), its series tracked; nothing abnormal yet.
    assert exported.totals["ingestd_anomaly_readings_judged_total"] == good
    assert sum(exported.families["ingestd_anomaly_readings_skipped"].values["cause"].values()) == 0
    assert exported.totals["ingestd_anomaly_series"] == 2  # one sensor on each of two devices

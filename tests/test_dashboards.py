"""The Grafana dashboard and the Prometheus alerting rules in deploy/: they parse, they are shaped as Grafana
and Prometheus expect, and every expression names only metrics the daemon exports.

"Exported" comes from a live ``Metrics()`` (the daemon's own registry, the families ``metric_names``
lists), expanded by type into the series names the text exposition carries (a counter ``x`` is scraped as
``x_total`` and ``x_created``, a histogram as ``x_bucket``/``x_sum``/``x_count``/``x_created``). A metric the
daemon adds later is therefore known here without touching this file; a metric it renames or drops makes
the test name the expression that still uses the old name.

Metric names are pulled out of the PromQL by ``tests/promql.py``'s ``metric_identifiers``, a small
tokenizer, not a parser (its limits are listed there); in particular it does not check label names, nor
that ``$labels.x`` in an annotation survives the aggregation.

``promtool`` (Debian package ``prometheus``; not installed by scripts/install.sh) is optional: with it on
PATH, or named by ``$PROMTOOL``, the rules files and the dashboard's expressions (as recording rules, with
Grafana's placeholders filled in) are syntax-checked, and the alerts are run against synthetic series;
without it those tests skip and say so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from tests.promql import GRAFANA_VARIABLE, metric_identifiers
from tts_streamer.supervisor.ops.metrics import Metrics, metric_names

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "tts-streamer.json"
RULES = ROOT / "deploy" / "prometheus" / "tts-streamer-rules.yml"
PROMETHEUS_RULE = ROOT / "deploy" / "kubernetes" / "prometheus-rule.yaml"
DEPLOYMENT = ROOT / "deploy" / "kubernetes" / "deployment.yaml"

# Series names a scrape carries for each family type (prometheus_client's text exposition).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}
# What the dashboard must show, whatever else is added (issue 15 §8: the metrics that matter).
DASHBOARD_MUST_SHOW = {
    "tts_streamer_active_sessions",
    "tts_streamer_sessions_started_total",
    "tts_streamer_sessions_ended_total",
    "tts_streamer_pacing_lateness_seconds_bucket",
    "tts_streamer_flush_to_silence_seconds_bucket",
    "tts_streamer_vendor_first_audio_seconds_bucket",
    "tts_streamer_vendor_errors_total",
    "tts_streamer_broker_connected",
    "tts_streamer_events_pending",
    "tts_streamer_events_dropped_total",
    "tts_streamer_command_errors_total",
    "tts_streamer_tasks",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
}
SEVERITIES = {"critical", "warning", "info"}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}


def test_the_tokenizer_finds_metrics_and_only_metrics() -> None:
    expr = """
        histogram_quantile(0.99, sum by (le, vendor) (rate(a_bucket{vendor!~"x}y"}[$__rate_interval])))
        / on (instance) group_left (pod) b_total offset 5m  # c_total in a comment
        > 1e-3 and ignoring (kind) label_replace(c_seconds, "dst", "$1", "src", "(.*)")
        or topk(5, d) unless sum without (reason) (rate(e_total[5m:1m])) * 0x1F + inf
    """
    assert metric_identifiers(expr) == {"a_bucket", "b_total", "c_seconds", "d", "e_total"}
    assert metric_identifiers('max_over_time(x{job=~"$job", instance=~"${instance}"}[2m]) == 0') == {"x"}
    with pytest.raises(ValueError, match="unknown PromQL function 'rated'"):
        metric_identifiers("rated(x_total[5m])")
    with pytest.raises(ValueError, match="__name__"):
        metric_identifiers('{__name__=~"tts_.*"}')
    with pytest.raises(ValueError, match="unbalanced"):
        metric_identifiers("sum(rate(x[5m])")


# -- what the daemon exports ---------------------------------------------------------------------------


def exported_series() -> set[str]:
    metrics = Metrics()
    families = {family.name: family.type for family in metrics.registry.collect()}
    assert set(families) == set(metric_names(metrics))
    return {name + suffix for name, kind in families.items() for suffix in SUFFIXES[kind]}


def test_exported_series_follow_the_exposition() -> None:
    series = exported_series()
    assert {"tts_streamer_frames_sent_total", "tts_streamer_pacing_lateness_seconds_bucket"} <= series
    assert "tts_streamer_frames_sent" not in series, "a counter is scraped with _total, never bare"
    assert "tts_streamer_pacing_lateness_seconds" not in series, "a classic histogram has no bare series"


# -- the dashboard -------------------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(DASHBOARD.read_text()))


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = _dashboard()
    found = [
        (f"panel {panel['title']!r} {target['refId']}", target["expr"])
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            text = query["query"] if isinstance(query, dict) else query
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", text) or re.fullmatch(
                r"query_result\((.*)\)", text
            )
            assert inner, f"variable {variable['name']}: a label_values or query_result query, got {text!r}"
            found.append((f"variable {variable['name']}", inner.group(1)))
    return found


def test_dashboard_is_importable() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasource = variables["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    ids = [panel["id"] for panel in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    # No data source uid of the machine it was exported on: every query goes to the chosen data source.
    text = DASHBOARD.read_text()
    assert "${DS_PROMETHEUS}" not in text or "__inputs" in dashboard
    for panel in _panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
        for target in panel["targets"]:
            for variable in re.findall(r"\$\{?(\w+)", target["expr"]):
                assert variable in variables or variable in GRAFANA_BUILTINS, f"{panel['title']}: ${variable}"
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_names_only_exported_metrics() -> None:
    series = exported_series()
    expressions = dashboard_expressions()
    unknown = {
        (where, name)
        for where, expr in expressions
        for name in metric_identifiers(expr)
        if name not in series
    }
    assert unknown == set(), "the dashboard asks for series the daemon does not export"
    shown = set().union(*(metric_identifiers(expr) for _, expr in expressions))
    assert DASHBOARD_MUST_SHOW - shown == set(), "the dashboard misses metrics that matter"
    for where, expr in expressions:
        assert metric_identifiers(expr), f"{where}: an expression that selects no metric"
        # process_* series come from every exporter: they must be narrowed to this job's targets.
        if any(name.startswith("process_") for name in metric_identifiers(expr)):
            assert "$instance" in expr, where


# -- the alerting rules --------------------------------------------------------------------------------


def _rule_groups() -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], yaml.safe_load(RULES.read_text())["groups"])


def _rules() -> Iterator[dict[str, Any]]:
    for group in _rule_groups():
        yield from group["rules"]


def test_the_prometheus_rule_carries_the_same_rules() -> None:
    (doc,) = [d for d in yaml.safe_load_all(PROMETHEUS_RULE.read_text()) if d is not None]
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["namespace"] == "bin-manager"
    assert doc["spec"]["groups"] == _rule_groups(), "edit both rule files alike"
    kustomization = yaml.safe_load((PROMETHEUS_RULE.parent / "kustomization.yaml").read_text())
    assert PROMETHEUS_RULE.name not in kustomization["resources"], "needs the operator's CRD: kept optional"


def test_rules_are_well_formed() -> None:
    groups = _rule_groups()
    assert [g["name"] for g in groups] == ["tts-streamer"]
    names = [rule["alert"] for rule in _rules()]
    assert len(names) == len(set(names)) and len(names) >= 10
    for rule in _rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
        assert re.fullmatch(r"TtsStreamer[A-Z][A-Za-z0-9]+", rule["alert"])
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        if "for" in rule:
            assert re.fullmatch(r"(\d+[smhd])+", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]
        for text in rule["annotations"].values():
            assert text.count("{{") == text.count("}}"), rule["alert"]


def test_rules_name_only_exported_metrics() -> None:
    series = exported_series()
    for rule in _rules():
        names = metric_identifiers(rule["expr"])
        assert names, f"{rule['alert']}: selects no metric"
        assert names - series == set(), f"{rule['alert']} asks for series the daemon does not export"
        if any(name.startswith("process_") for name in names):
            # Every Python exporter has process_*: keep only the targets that are tts-streamer.
            assert "and on (job, instance) tts_streamer_tasks" in " ".join(rule["expr"].split()), rule[
                "alert"
            ]
    covered = set().union(*(metric_identifiers(rule["expr"]) for rule in _rules()))
    must_alert = {
        "tts_streamer_broker_connected",
        "tts_streamer_events_dropped_total",
        "tts_streamer_pacing_lateness_seconds_bucket",
    }
    assert must_alert <= covered


def test_memory_alert_fires_below_the_deployment_limit() -> None:
    (rule,) = [r for r in _rules() if r["alert"] == "TtsStreamerMemoryHigh"]
    match = re.search(r">\s*([0-9][0-9 *]*?)\s+and\b", rule["expr"])
    assert match, rule["expr"]
    threshold = 1
    for factor in match.group(1).split("*"):
        threshold *= int(factor)
    deployment = next(
        d for d in yaml.safe_load_all(DEPLOYMENT.read_text()) if d and d["kind"] == "Deployment"
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    limit = container["resources"]["limits"]["memory"]
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", limit).groups()  # type: ignore[union-attr]
    assert 0.7 * int(number) * units[unit] <= threshold < int(number) * units[unit]


# -- promtool, when installed ---------------------------------------------------------------------------


def _promtool() -> str:
    exe = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not exe:
        pytest.skip(
            "promtool not installed (Debian: apt-get install prometheus, or set PROMTOOL=/path/to/promtool); "
            "the YAML structure and metric names are still checked above"
        )
    return exe


def _run(args: list[str], cwd: Path | None = None) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    promtool = _promtool()
    operator = tmp_path / "operator-rules.yml"
    operator.write_text(yaml.safe_dump(yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]))
    _run([promtool, "check", "rules", str(RULES), str(operator)])


def test_promtool_accepts_the_dashboard_expressions(tmp_path: Path) -> None:
    promtool = _promtool()
    fill = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
    rules = []
    for n, (_, expr) in enumerate(dashboard_expressions()):
        for placeholder, value in fill.items():
            expr = expr.replace(placeholder, value)
        expr = GRAFANA_VARIABLE.sub(".*", expr)
        rules.append({"record": f"dashboard:expr_{n}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run([promtool, "check", "rules", str(path)])


def test_bucket_bounds_named_in_expressions_exist() -> None:
    """An ``le="0.05"`` on a bucket the histogram does not have selects nothing, and the ratio it feeds
    reads 100 % (or no data) without any error."""
    bounds: dict[str, set[float]] = {}
    for family in Metrics().registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bounds.setdefault(sample.name, set()).add(float(sample.labels["le"]))
    expressions = [expr for _, expr in dashboard_expressions()] + [rule["expr"] for rule in _rules()]
    used = 0
    for expr in expressions:
        for name, matchers in re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*_bucket)\{([^}]*)\}", expr):
            for le in re.findall(r'\ble\s*=\s*"([^"]+)"', matchers):
                used += 1
                assert name in bounds, f"{name}: no buckets visible without observations"
                assert float(le) in bounds[name], f'{name}{{le="{le}"}} is not one of its buckets'
    assert used > 0


def _alert_tests() -> list[dict[str, Any]]:
    """Synthetic series for ``promtool test rules``: each alert fires where it should, and not beside it."""
    pod = 'job="tts-streamer", instance="10.0.0.1:9090"'
    other = 'job="tts-streamer", instance="10.0.0.2:9090"'
    labels = {"job": "tts-streamer", "instance": "10.0.0.1:9090"}
    return [
        {
            "interval": "1m",
            "input_series": [
                {"series": f"tts_streamer_broker_connected{{{pod}}}", "values": "1 1 0x10"},
                {"series": f"tts_streamer_broker_connected{{{other}}}", "values": "1x12"},
                {"series": f"tts_streamer_events_dropped_total{{{pod}}}", "values": "0 0 0 5 5"},
                {"series": f"tts_streamer_events_dropped_total{{{other}}}", "values": "0x4"},
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "TtsStreamerBrokerDisconnected", "exp_alerts": []},
                {
                    "eval_time": "8m",
                    "alertname": "TtsStreamerBrokerDisconnected",
                    "exp_alerts": [{"exp_labels": {**labels, "severity": "critical"}}],
                },
                {
                    "eval_time": "4m",
                    "alertname": "TtsStreamerEventsDropped",
                    "exp_alerts": [{"exp_labels": {**labels, "severity": "critical"}}],
                },
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                # 50 messages a second; 2 % (this pod) and 0.5 % (the other) later than 50 ms.
                {"series": f"tts_streamer_pacing_lateness_seconds_count{{{pod}}}", "values": "0+3000x30"},
                {
                    "series": f'tts_streamer_pacing_lateness_seconds_bucket{{{pod}, le="0.05"}}',
                    "values": "0+2940x30",
                },
                {"series": f"tts_streamer_pacing_lateness_seconds_count{{{other}}}", "values": "0+3000x30"},
                {
                    "series": f'tts_streamer_pacing_lateness_seconds_bucket{{{other}, le="0.05"}}',
                    "values": "0+2985x30",
                },
                {"series": f"process_resident_memory_bytes{{{pod}}}", "values": f"{400 << 20}x30"},
                {"series": f"tts_streamer_tasks{{{pod}}}", "values": "40x30"},
                # Another exporter's process on the same Prometheus: not ours, never alerts.
                {"series": 'process_resident_memory_bytes{job="other", instance="x:1"}', "values": "1e10x30"},
            ],
            "alert_rule_test": [
                {
                    "eval_time": "20m",
                    "alertname": "TtsStreamerUnderrunRisk",
                    "exp_alerts": [{"exp_labels": {"instance": labels["instance"], "severity": "warning"}}],
                },
                {
                    "eval_time": "20m",
                    "alertname": "TtsStreamerMemoryHigh",
                    "exp_alerts": [{"exp_labels": {**labels, "severity": "warning"}}],
                },
                {"eval_time": "20m", "alertname": "TtsStreamerMetricsAbsent", "exp_alerts": []},
            ],
        },
    ]


def test_promtool_alerts_fire_on_synthetic_series(tmp_path: Path) -> None:
    promtool = _promtool()
    # Without annotations: promtool compares them verbatim, and their wording is not what is tested here.
    groups = [
        {**group, "rules": [{k: v for k, v in rule.items() if k != "annotations"} for rule in group["rules"]]}
        for group in _rule_groups()
    ]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": groups}))
    spec = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": _alert_tests()}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(spec))
    _run([promtool, "test", "rules", "tests.yml"], cwd=tmp_path)

"""Monitoring as code, tested for real.

* the alert rules' unit tests (``promtool test rules``), and that they catch a changed threshold;
* both Prometheus configs (``promtool check config``), their thresholds against the settings;
* docker-compose.yml (``docker-compose config``, no engine needed) against the local settings;
* the Grafana provisioning and dashboard JSON;
* metrics that rarely move (gate refusals, label changes, bundle rejections, Redis errors, the
  retired segment's gauges) made to move in-process;
* **the real scrape**: a consumer and a trainer as processes on the local stack, the demo
  producer with its drift switch, and Debian's Prometheus scraping them every second with the
  repository's rules. Every PromQL expression of the dashboard returns data, every metric the
  alert rules select exists, every documented metric moves, and the drift makes
  ``segment_silhouette_drift`` and ``segment_centroid_drift`` move and the drift alert's expression
  become true;
* **a birth**: a consumer scoring the model's own population keeps the novelty alert's expression
  false; a new population far from every segment makes it true in a real Prometheus.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.cluster import KMeans

from demo.generator import Customer, Profile, event_value, make_customers
from demo.producer import DemoProducer
from segmentation import domain
from segmentation import metrics as metrics_module
from segmentation.bundle import Lineage, ModelBundle, Quality
from segmentation.cluster_metrics import nearest_two
from segmentation.events import REASONS, CustomerEvent, raw_numeric
from segmentation.features import FeatureSpec
from segmentation.metrics import ConsumerMetrics, TrainerMetrics, serve
from segmentation.settings import Settings
from segmentation.store import CustomerStore, ModelStore
from tests.support.prometheus import (
    ALERT_TESTS,
    ALERTS,
    MONITORING,
    PROM_LOCAL,
    ROOT,
    Process,
    alert_rules,
    load_yaml,
    local_prometheus,
    need,
    run,
    start_trainer_and_consumer,
    tails,
)
from tests.support.stack import (
    RunningConsumer,
    customers,
    free_port,
    produce_events,
    produce_raw,
    running_consumer,
    sample,
    wait_until,
)
from trainer.__main__ import train_config
from trainer.pipeline import train_once

PROM_COMPOSE = MONITORING / "prometheus-compose.yml"
GRAFANA = MONITORING / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "segmentation.json"
DATASOURCE = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "dashboards.yml"
COMPOSE = ROOT / "docker-compose.yml"

# The documented metric names (a contract: dashboards, alerts and users' queries use them).
CONTRACT_CONSUMER_METRICS = (
    "segment_events_total", "segment_assignments_total", "segment_batch_duration_seconds",
    "segment_event_lag_seconds", "segment_consumer_lag_messages", "segment_silhouette",
    "segment_silhouette_baseline", "segment_silhouette_drift", "segment_centroid_drift",
    "segment_share", "segment_share_psi", "segment_model_version", "segment_model_age_seconds",
    "segment_bundle_rejections_total", "segment_redis_errors_total",
)
CONTRACT_TRAINER_METRICS = (
    "segment_trainer_runs_total", "segment_trainer_duration_seconds", "segment_trainer_silhouette",
    "segment_trainer_davies_bouldin", "segment_trainer_k", "segment_trainer_label_changes_total",
    "segment_trainer_last_publish_timestamp_seconds",
)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Exposition text -> {(sample name, labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), float("nan"))


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return resp.read().decode()


# =============================================================================================
# Alert rules: promtool unit tests
# =============================================================================================
def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    need("promtool")
    result = run(["promtool", "test", "rules", str(ALERT_TESTS.relative_to(ROOT))])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    cases: dict[str, set[bool]] = {}
    for group in load_yaml(ALERT_TESTS)["tests"]:
        for case in group.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    for name in alert_rules():
        assert cases.get(name) == {True, False}, f"{name}: needs a firing case and a quiet case"
    assert set(cases) <= set(alert_rules()), "unit tests name an alert that does not exist"


# Each mutation breaks one rule the way a careless edit would; the unit tests must notice.
MUTATIONS = [
    ("SegmentSilhouetteDrift", "(segment_silhouette_drift) < -0.1", "(segment_silhouette_drift) < -0.2"),
    ("SegmentSilhouetteDrift", "max by (job) (segment_silhouette", "min by (job) (segment_silhouette"),
    ("SegmentCollapsed", "(segment_share) < 0.01", "(segment_share) < 0.001"),
    ("SegmentNoveltyHigh", "(segment_novelty_share) > 0.03", "(segment_novelty_share) > 0.06"),
    ("SegmentNoveltyHigh", "min by (job) (segment_novelty", "max by (job) (segment_novelty"),
    ("SegmentNoveltyHigh", "> 0.03\n        for: 10m", "> 0.03\n        for: 1m"),
    ("ConsumerLagGrowing", "lag_messages) > 1000", "lag_messages) > 10000"),
    ("ConsumerLagGrowing", "[10m:1m]) > 0", "[10m:1m]) > -1e9"),
    ("DeadLetterRateHigh", "  > 0.05", "  > 0.1"),
    ("ModelStale", "2 * 600\n          and on ()", "2 * 1200\n          and on ()"),
    ("ModelStale", "and on ()", "or on ()"),
    ("ConsumerDown", 'up{job="consumer"} == 0', 'up{job="consumer"} == 1'),
    ("ConsumersAbsent", 'absent(up{job="consumer"} == 1)', 'absent(up{job="consumer"})'),
    ("TrainerDown", 'absent(up{job="trainer"} == 1)', 'absent(up{job="trainer"})'),
    ("PublishedModelBelowBaseline", "published_silhouette) > 0.1", "published_silhouette) > 0.5"),
    ("PublishedModelBelowBaseline", "(segment_trainer_baseline_silhouette - segment_trainer_published",
     "(segment_trainer_published_silhouette - segment_trainer_baseline"),
    ("QualityGateFailing", "(segment_trainer_gate_failing) > 0", "(segment_trainer_gate_failing) > 1"),
    ("QualityGateFailing", "max by (job, check)", "max by (job)"),
]


@pytest.mark.system  # one promtool run per mutation: make system, not make test
@pytest.mark.parametrize(("alert", "old", "new"), MUTATIONS, ids=[f"{a}:{n}" for a, _, n in MUTATIONS])
def test_the_rule_unit_tests_catch_a_changed_rule(tmp_path: Path, alert: str, old: str, new: str) -> None:
    need("promtool")
    text = ALERTS.read_text()
    assert text.count(old) == 1, f"mutation target {old!r} not found once in alerts.yml"
    (tmp_path / "alerts.yml").write_text(text.replace(old, new))
    shutil.copy(ALERT_TESTS, tmp_path / "alerts_test.yml")
    result = run(["promtool", "test", "rules", "alerts_test.yml"], cwd=tmp_path)
    assert result.returncode != 0, f"{alert}: unit tests still pass with {new!r}"


def test_alert_thresholds_follow_the_settings_defaults() -> None:
    fields = Settings.model_fields
    rules = alert_rules()
    drift = fields["drift_retrain_threshold"].default
    assert rules["SegmentSilhouetteDrift"]["expr"].strip().endswith(f"< -{drift}")
    novelty = fields["novelty_retrain_share"].default
    assert rules["SegmentNoveltyHigh"]["expr"].strip().endswith(f"> {novelty}")
    floor = fields["gate_min_share"].default
    assert rules["SegmentCollapsed"]["expr"].strip().endswith(f"< {floor}")
    interval = int(fields["train_interval_s"].default)
    assert rules["ModelStale"]["expr"].count(f"> 2 * {interval}") == 2
    drop = fields["gate_max_silhouette_drop"].default
    assert rules["PublishedModelBelowBaseline"]["expr"].strip().endswith(f"> {drop}")
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert {"summary", "description"} <= set(rule["annotations"]), name


# =============================================================================================
# Prometheus configs
# =============================================================================================
@pytest.mark.parametrize("config", [PROM_LOCAL, PROM_COMPOSE], ids=lambda p: p.name)
def test_prometheus_config_is_valid_and_scrapes_both_jobs_with_the_rules(config: Path) -> None:
    need("promtool")
    result = run(["promtool", "check", "config", str(config.relative_to(ROOT))])
    assert result.returncode == 0, result.stdout + result.stderr
    loaded = load_yaml(config)
    assert [Path(config.parent, f).resolve() for f in loaded["rule_files"]] == [ALERTS.resolve()]
    jobs = {j["job_name"]: j for j in loaded["scrape_configs"]}
    assert {"consumer", "trainer"} <= set(jobs)


def test_compose_prometheus_discovers_every_consumer_replica_on_the_metrics_port() -> None:
    jobs = {j["job_name"]: j for j in load_yaml(PROM_COMPOSE)["scrape_configs"]}
    (sd,) = jobs["consumer"]["dns_sd_configs"]
    assert sd["type"] == "A" and sd["names"] == ["consumer"] and sd["port"] == 9100
    assert jobs["trainer"]["static_configs"] == [{"targets": ["trainer:9100"]}]


# =============================================================================================
# docker-compose.yml
# =============================================================================================
def compose_config() -> dict[str, Any]:
    """docker-compose.yml as Compose resolves it (anchors, merges, defaults)."""
    need("docker-compose")
    result = run(["docker-compose", "-f", str(COMPOSE), "config"], env=COMPOSE_ENV)
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


# what `.env` holds in a real deployment (`.env.example`)
COMPOSE_ENV = {**os.environ, "REDIS_PASSWORD": "test-redis-secret", "GRAFANA_ADMIN_PASSWORD": "test-grafana"}


def published_ports(service: dict[str, Any]) -> dict[int, str]:
    """Published port -> host address, from either form `docker-compose config` prints."""
    out = {}
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out[int(port["published"])] = port.get("host_ip", "0.0.0.0")
        else:
            parts = str(port).split("/")[0].split(":")
            out[int(parts[-2])] = parts[0] if len(parts) == 3 else "0.0.0.0"
    return out


def test_compose_file_validates() -> None:
    need("docker-compose")
    result = run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], env=COMPOSE_ENV)
    assert result.returncode == 0, f"docker-compose config -q failed:\n{result.stderr}"
    unset = {k: v for k, v in COMPOSE_ENV.items() if k not in ("REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD")}
    refused = run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], env=unset)
    assert refused.returncode != 0 and "REDIS_PASSWORD" in refused.stderr  # no default secret


def test_compose_stack_is_consistent_with_the_local_settings() -> None:
    services = compose_config()["services"]
    assert set(services) == {"kafka", "topics", "redis", "consumer", "trainer", "producer", "prometheus",
                             "grafana"}
    assert services["consumer"]["deploy"]["replicas"] == 2
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft

    fields = Settings.model_fields
    for name, service in services.items():
        for var in service.get("environment", {}):
            if var.startswith("SEG_"):
                assert var[4:].lower() in fields, f"{name}: {var} is not a setting"
    defaults = Settings()
    for name in ("consumer", "trainer", "producer"):
        env = services[name]["environment"]
        assert env["SEG_KAFKA_BOOTSTRAP"].split(":") == ["kafka", defaults.kafka_bootstrap.split(":")[1]]
        redis_url = urllib.parse.urlparse(env["SEG_REDIS_URL"])
        assert redis_url.hostname == "redis"
        assert redis_url.port == urllib.parse.urlparse(defaults.redis_url).port
        assert services[name]["depends_on"]["kafka"]["condition"] == "service_healthy"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in ("consumer", "trainer"):  # what monitoring/prometheus-compose.yml scrapes
        assert str(services[name]["environment"]["SEG_METRICS_PORT"]) == "9100", name
    interval = int(fields["train_interval_s"].default)  # what the ModelStale rule assumes
    assert int(float(services["trainer"]["environment"].get("SEG_TRAIN_INTERVAL_S", interval))) == interval
    published = {name: published_ports(s) for name, s in services.items()}
    # nothing beyond the host's loopback, Redis not at all
    assert published["kafka"] == {9092: "127.0.0.1"} and published["redis"] == {}
    assert published["prometheus"] == {9090: "127.0.0.1"} and published["grafana"] == {3000: "127.0.0.1"}
    assert "--web.enable-lifecycle" not in services["prometheus"]["command"]
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "test-grafana"
    redis_command = services["redis"]["command"]
    assert "default" in redis_command and "~seg:*" in redis_command and "-@dangerous" in redis_command
    for name in ("consumer", "trainer", "producer"):
        assert services[name]["environment"]["SEG_REDIS_USERNAME"] == "seg"

    for name in ("kafka", "redis", "consumer", "trainer", "prometheus", "grafana"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"

    mounts = {name: {v.split(":")[1]: Path(v.split(":")[0]) for v in s.get("volumes", [])}
              for name, s in services.items()}
    prom = mounts["prometheus"]
    assert prom["/etc/prometheus/prometheus.yml"].resolve() == PROM_COMPOSE.resolve()
    assert prom["/etc/prometheus/alerts.yml"].resolve() == ALERTS.resolve()
    grafana = mounts["grafana"]
    assert grafana["/etc/grafana/provisioning"].resolve() == (GRAFANA / "provisioning").resolve()
    provider_path = load_yaml(PROVIDERS)["providers"][0]["options"]["path"]
    assert grafana[provider_path].resolve() == DASHBOARD.parent.resolve()


# =============================================================================================
# Grafana
# =============================================================================================
def dashboard_panels(panels: list[dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    for panel in panels if panels is not None else json.loads(DASHBOARD.read_text())["panels"]:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, expr) of every panel target."""
    return [(f"panel {p['title']!r} target {t['refId']}", t["expr"])
            for p in dashboard_panels() for t in p.get("targets", [])]


def dashboard_annotation_queries() -> list[tuple[str, str]]:
    annotations = json.loads(DASHBOARD.read_text())["annotations"]["list"]
    return [(f"annotation {a['name']!r}", a["expr"]) for a in annotations if "expr" in a]


GRAFANA_MACROS = {"$__rate_interval": "30s", "$__interval": "30s", "$__range": "5m"}


def expand_macros(expr: str) -> str:
    for macro, replacement in GRAFANA_MACROS.items():
        expr = expr.replace(macro, replacement)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def test_grafana_datasource_and_dashboard_are_consistent() -> None:
    (ds,) = load_yaml(DATASOURCE)["datasources"]
    assert ds["uid"] == "prometheus" and ds["type"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090"
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "segmentation" and board["templating"]["list"] == []
    panels = list(dashboard_panels())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), "duplicate panel titles"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": ds["uid"]}, p["title"]
        assert p.get("description"), f"panel {p['title']!r} has no description"
        assert p["fieldConfig"]["defaults"].get("unit"), f"panel {p['title']!r} has no unit"
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == ds["uid"] and t["expr"].strip(), p["title"]
            expand_macros(t["expr"])
    text = " ".join(expr for _, expr in dashboard_queries())
    # what the dashboard must show
    for needle in ('segment_events_total{outcome="dead_letter"}', "segment_consumer_lag_messages",
                   "histogram_quantile(0.95, sum by (le) (rate(segment_event_lag_seconds_bucket",
                   "segment_share)", "segment_silhouette_baseline", 'segment_silhouette{kind="sampled"}',
                   "max by (segment_id) (segment_centroid_drift)", "segment_model_version",
                   "segment_trainer_runs_total", "segment_trainer_gate_refusals_total",
                   "segment_trainer_label_changes_total"):
        assert needle in text, f"the dashboard does not show {needle}"


def test_every_exported_metric_is_on_the_dashboard_or_in_an_alert() -> None:
    exprs = " ".join(e for _, e in dashboard_queries()) + " ".join(r["expr"] for r in alert_rules().values())
    for registry in (ConsumerMetrics().registry, TrainerMetrics().registry):
        for family in registry.collect():
            name = family.name + ("_total" if family.type == "counter" else "")
            assert name in exprs, f"{name} is exported but neither charted nor alerted on"


# =============================================================================================
# Metric definitions against the code that sets them
# =============================================================================================
def source(*parts: str) -> str:
    return "\n".join(p.read_text() for part in parts for p in sorted((ROOT / part).glob("*.py")))


def test_label_values_exported_up_front_cover_every_value_the_code_uses() -> None:
    code = source("consumer", "trainer", "segmentation")

    def used(pattern: str) -> set[str]:
        return set(re.findall(pattern, code))

    m = metrics_module
    assert used(r'redis_errors\.labels\("(\w+)"\)') <= set(domain.REDIS_OPERATIONS)
    assert used(r'GateFailure\(\s*"(\w+)"') <= set(domain.GATE_CHECKS)
    assert used(r'RunResult\(\s*"(\w+)"') <= set(domain.RUN_RESULTS)
    assert used(r'label_changes\.labels\("(\w+)"\)') == set(domain.LABEL_CHANGE_KINDS)
    assert used(r'events\.labels\("(\w+)"\)') == set(m.OUTCOMES)
    exported = samples(scrape_registry(ConsumerMetrics().registry))
    for reason in REASONS:
        assert value(exported, "segment_dead_letters_total", reason=reason) == 0
    trainer = samples(scrape_registry(TrainerMetrics().registry))
    for check in domain.GATE_CHECKS:
        assert value(trainer, "segment_trainer_gate_refusals_total", check=check) == 0


def scrape_registry(registry: Any) -> str:
    """/metrics of ``registry`` over HTTP, as Prometheus sees it (also checks the probes)."""
    port = free_port()
    server = serve(registry, port, ready=lambda: False)
    try:
        assert scrape(port, "/healthz") == "ok\n"
        with pytest.raises(urllib.error.HTTPError) as err:
            scrape(port, "/readyz")
        assert err.value.code == 503
        return scrape(port)
    finally:
        server.shutdown()


# =============================================================================================
# Metrics that rarely move, made to move in-process (real Kafka and Redis)
# =============================================================================================
@pytest.mark.integration
def test_trainer_metrics_move_on_publish_retrain_forced_publish_and_refusal(
    settings: Settings, store: ModelStore
) -> None:
    metrics = TrainerMetrics()
    produce_events(settings, customers(600))
    before = time.time()
    assert train_once(train_config(settings), store, metrics).result == "published"
    first = samples(scrape_registry(metrics.registry))
    assert value(first, "segment_trainer_runs_total", result="published") == 1
    assert value(first, "segment_trainer_label_changes_total", kind="new") == 5
    assert value(first, "segment_trainer_label_changes_total", kind="matched") == 0
    assert value(first, "segment_trainer_last_publish_timestamp_seconds") >= before
    assert value(first, "segment_trainer_k") == 5
    assert 0.3 < value(first, "segment_trainer_silhouette") <= 1
    assert 0 < value(first, "segment_trainer_davies_bouldin") < 2
    assert value(first, "segment_trainer_duration_seconds_count") == 1
    assert value(first, "segment_trainer_duration_seconds_sum") > 0
    assert value(first, "segment_trainer_window_rows", kind="used") >= 500

    # the same distribution again: every id is matched
    assert train_once(train_config(settings), store, metrics).result == "published"
    second = samples(scrape_registry(metrics.registry))
    assert value(second, "segment_trainer_label_changes_total", kind="matched") == 5
    assert value(second, "segment_trainer_label_changes_total", kind="retired") == 0
    # K=4 against 5 published segments, forced past the gate: at least one id is retired
    forced = train_once(train_config(settings.model_copy(update={"k": 4})), store, metrics, force=True)
    assert forced.result == "published"
    # a floor no segment of five can reach: the gate refuses
    refused = train_once(train_config(settings.model_copy(update={"gate_min_share": 0.5})), store, metrics)
    assert refused.result == "rejected", refused.detail

    after = samples(scrape_registry(metrics.registry))
    assert value(after, "segment_trainer_runs_total", result="published") == 3
    assert value(after, "segment_trainer_runs_total", result="rejected") == 1
    assert value(after, "segment_trainer_label_changes_total", kind="matched") >= 5
    assert value(after, "segment_trainer_label_changes_total", kind="retired") >= 1
    assert value(after, "segment_trainer_gate_refusals_total", check="min_share") >= 1
    assert value(after, "segment_trainer_duration_seconds_count") == 4


@pytest.mark.integration
def test_consumer_rare_metrics_move_and_a_retired_segment_leaves_the_gauges(
    settings: Settings, store: ModelStore
) -> None:
    produce_events(settings, customers(1000))
    assert train_once(train_config(settings), store, TrainerMetrics()).result == "published"
    v1_ids = {str(i) for i in store.load(1).segment_ids}
    rc = RunningConsumer(settings)
    # Per-customer state goes to a Redis that does not answer: every write fails after retries.
    dead = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2, socket_timeout=0.2)
    rc.loop.checkpoint.writer.customers = CustomerStore(dead, settings.redis_prefix)
    with _running(rc):
        m = rc.metrics

        def ids(metric: str) -> set[str]:
            return {dict(labels)["segment_id"] for (name, labels) in samples(
                generate_latest(m.registry).decode()) if name == metric}

        def shares() -> set[str]:
            return ids("segment_share")

        # channel values outside the model's vocabulary are encoded as "other" and counted
        unknown = [event_value(c, np.random.default_rng(3), f"kiosk-{i}") for i, c in
                   enumerate(customers(10, seed=3, prefix="k"))]
        produce_raw(settings, [(str(v["customer_id"]), json.dumps(
            {**v, "attributes": {"channel": "kiosk"}}).encode()) for v in unknown])
        wait_until(lambda: sample(m, "segment_events_total", outcome="scored") >= 1010, 60,
                   "1010 scored events")
        wait_until(lambda: shares() == v1_ids, 30, "a share gauge per segment of v1")
        scraped = samples(scrape_registry(m.registry))
        assert value(scraped, "segment_redis_errors_total", operation="customer_write") >= 1
        assert value(scraped, "segment_customer_writes_skipped_total") >= 1
        assert value(scraped, "segment_model_version") == 1
        assert value(scraped, "segment_bundle_rejections_total") == 0
        assert value(scraped, "segment_unknown_category_values_total") == 10

        # A pointer to a bundle that does not exist is refused and counted; v1 keeps scoring.
        store.client.set(f"{settings.redis_prefix}:current", "99")
        wait_until(lambda: sample(m, "segment_bundle_rejections_total") >= 1, 15, "the bundle rejection")
        store.client.set(f"{settings.redis_prefix}:current", "1")

        # v2 with K=4 retires at least one id: its share and centroid drift gauges go away.
        result = train_once(train_config(settings.model_copy(update={"k": 4})), store, TrainerMetrics(),
                            force=True)
        assert result.result == "published" and result.bundle is not None
        v2_ids = {str(i) for i in result.bundle.segment_ids}
        assert v1_ids - v2_ids, "K=4 retired nothing?"
        produce_events(settings, customers(300, seed=2), prefix="late")
        wait_until(lambda: shares() == v2_ids, 30, "share gauges of exactly the v2 segments")
        assert ids("segment_centroid_drift") == v2_ids
        assert samples(scrape_registry(m.registry))[("segment_model_version", frozenset())] == 2


@contextmanager
def _running(rc: RunningConsumer) -> Iterator[RunningConsumer]:
    rc.start()
    try:
        yield rc
    finally:
        rc.stop()


# =============================================================================================
# The real scrape
# =============================================================================================
DRIFT_WARP = 6.0  # the demo drift (2%/s, up to x4) runs this many times faster in the test


class FastDriftProducer(DemoProducer):
    """The demo producer with its drift switch on, its drift clock running DRIFT_WARP times
    faster (x4 after 25 s instead of 150 s) so that the test stays short."""

    def send_one(self, started: float) -> None:
        now = time.monotonic()
        super().send_one(now - DRIFT_WARP * (now - started))





PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
                "group_right", "bool", "offset", "inf", "nan"}


def selectors(expr: str) -> list[str]:
    """The vector selectors (metric name plus matchers) inside a PromQL expression.

    >>> selectors('max by (job, segment_id) (segment_share{a="b"}) < 0.01 and absent(up == 1)')
    ['segment_share{a="b"}', 'up']
    """
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    found = []
    for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?", e):
        name, matchers = m.group(1), m.group(2) or ""
        rest = e[m.end():].lstrip()
        if name.lower() in PROMQL_WORDS or rest.startswith("("):
            continue
        if m.start() > 0 and (e[m.start() - 1].isdigit() or e[m.start() - 1] in "\"'."):
            continue
        found.append(name + matchers)
    return found


@pytest.mark.integration
@pytest.mark.system  # a real Prometheus: the system tier (make system)
def test_a_real_prometheus_scrapes_a_consumer_and_a_trainer_and_every_query_returns_data(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    need("prometheus")
    need("promtool")
    # One model for the whole test: no scheduled retrain and no early retrain on drift (either
    # would reset the drift signals this test watches).
    settings = settings_factory(train_interval_s=3600, drift_retrain_after_s=3600)
    produce_events(settings, customers(1500))  # the undrifted history the first model learns
    ports = {"consumer": free_port(), "trainer": free_port()}
    processes: list[Process] = []
    prometheus = local_prometheus(tmp_path, ports)
    producer = FastDriftProducer(settings, run_id="monitoring", rate=300.0, drift=True)
    producing = threading.Thread(target=producer.run, name="drift-producer", daemon=True)
    started = time.monotonic()
    try:
        start_trainer_and_consumer(processes, settings, ports, tmp_path)
        prometheus.start()

        def logs() -> str:
            return tails(processes)

        def both_up() -> bool:
            assert all(p.proc.poll() is None for p in processes), logs()
            return len(prometheus.query('up{job=~"consumer|trainer"} == 1')) == 2

        wait_until(both_up, 30, "both targets scraped")
        wait_until(lambda: bool(prometheus.query('segment_model_version{job="consumer"} >= 1')), 60,
                   "the consumer scoring with the trainer's first model")
        producing.start()

        # --- drift: both drift metrics move and the drift alert's expression becomes true ------
        rules = {r["name"]: r for g in prometheus.api("rules")["groups"] for r in g["rules"]}
        assert set(rules) == set(alert_rules()), "Prometheus did not load every rule of alerts.yml"
        drift_expr = rules["SegmentSilhouetteDrift"]["query"]
        deadline = time.monotonic() + 120
        while not prometheus.query(drift_expr):
            assert time.monotonic() < deadline, (
                f"drift alert expression never true; drift now "
                f"{prometheus.query('segment_silhouette_drift')}\n{logs()}")
            assert all(p.proc.poll() is None for p in processes), logs()
            time.sleep(1)
        drift_seen_after = time.monotonic() - started
        wait_until(lambda: any(a["labels"]["alertname"] == "SegmentSilhouetteDrift"
                               and a["state"] == "pending" for a in prometheus.api("alerts")["alerts"]),
                   10, "SegmentSilhouetteDrift pending in Prometheus' rule evaluation")
        assert prometheus.scalar("max_over_time(segment_silhouette_drift[10m])") > -0.05
        assert prometheus.scalar("min_over_time(segment_silhouette_drift[10m])") < -0.1
        moved = prometheus.query("max_over_time(segment_centroid_drift[10m])")
        by_segment = sorted(float(r["value"][1]) for r in moved)
        # The drifting segment's online centroid moves, and only that one. It follows the drift
        # only up to the segment's outlier radius: events beyond it are never learned, and from
        # there on the novelty share measures the drift.
        assert len(by_segment) == 5 and by_segment[-1] > 0.1, by_segment
        assert by_segment[-1] > 5 * by_segment[-2], by_segment
        assert prometheus.scalar("max_over_time(segment_novelty_share[10m])") > 0.03

        # --- every expression of the dashboard returns data --------------------------------------
        assert not prometheus.query("sum(rate(segment_evnets_total[30s]))")  # the check works
        empty = [f"{where}: {expr}" for where, expr in dashboard_queries()
                 if not prometheus.query(expand_macros(expr))]
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

        # --- every alert rule evaluates, and every metric it selects has data -------------------
        sparse = [(f"alert {name}", rule["query"]) for name, rule in rules.items()]
        sparse += [(w, expand_macros(e)) for w, e in dashboard_annotation_queries()]
        missing = []
        for where, expr in sparse:
            prometheus.query(expr)  # evaluates without error
            found = selectors(expr)
            assert found, (where, expr)
            missing += [f"{where}: {s}" for s in found if not prometheus.query(s)]
        assert not missing, "selectors without data:\n" + "\n".join(missing)

        # --- a backlog shows as consumer lag: the consumer is stopped for a while as the producer
        # goes on (a consumer that keeps up reports 0 at every scrape, so lag cannot be left to luck)
        consumer = processes[1].proc
        consumer.send_signal(signal.SIGSTOP)
        backlog_from = producer._seq
        wait_until(lambda: producer._seq >= backlog_from + 1000, 30, "a backlog of 1,000 events")
        consumer.send_signal(signal.SIGCONT)
        wait_until(lambda: prometheus.scalar("max_over_time(sum(segment_consumer_lag_messages)[1m:1s])") > 0,
                   30, "the backlog as consumer lag")
        # the scrapes that failed while it was stopped marked its series stale: wait for fresh ones
        wait_until(lambda: bool(prometheus.query('segment_events_total{outcome="scored"}')), 30,
                   "the consumer scraped again")

        # --- every documented metric is exported, and moved --------------------------------
        names = set(prometheus.api("label/__name__/values"))
        for name in CONTRACT_CONSUMER_METRICS + CONTRACT_TRAINER_METRICS:
            family = {name, f"{name}_count", f"{name}_bucket"}
            assert family & names, f"{name} not scraped"
        moves: dict[str, Callable[[float], bool]] = {
            'segment_events_total{outcome="scored"}': lambda v: v > 1000,
            'segment_events_total{outcome="dead_letter"}': lambda v: v > 0,
            "count(segment_assignments_total > 0)": lambda v: v == 5,
            "segment_batch_duration_seconds_count": lambda v: v > 0,
            "segment_event_lag_seconds_count": lambda v: v > 1000,
            "max_over_time(sum(segment_consumer_lag_messages)[10m:1s])": lambda v: v > 0,
            'segment_silhouette{kind="simplified"}': lambda v: 0 < v < 1,
            'segment_silhouette{kind="sampled"}': lambda v: 0 < v < 1,
            "segment_silhouette_baseline": lambda v: 0.3 < v < 1,
            "count(segment_share)": lambda v: v == 5,
            "sum(segment_share)": lambda v: abs(v - 1) < 1e-6,
            "max_over_time(segment_share_psi[10m])": lambda v: v > 0.01,
            "segment_model_version": lambda v: v == 1,
            "segment_model_age_seconds": lambda v: v > 0,
            'sum(segment_trainer_runs_total{result="published"})': lambda v: v == 1,
            "segment_trainer_duration_seconds_count": lambda v: v >= 1,
            "segment_trainer_silhouette": lambda v: 0.3 < v < 1,
            "segment_trainer_davies_bouldin": lambda v: 0 < v < 2,
            "segment_trainer_k": lambda v: v == 5,
            'segment_trainer_label_changes_total{kind="new"}': lambda v: v == 5,
            "time() - segment_trainer_last_publish_timestamp_seconds": lambda v: 0 < v < 300,
            # exported at 0, moved by the in-process tests above
            "segment_bundle_rejections_total": lambda v: v == 0,
            "sum(segment_redis_errors_total)": lambda v: v == 0,
            # every refused run counted at least one refused check
            'sum(segment_trainer_gate_refusals_total) - sum(segment_trainer_runs_total{result="rejected"})':
                lambda v: v >= 0,
        }
        wrong = []
        for expr, ok in moves.items():
            v = prometheus.scalar(expr)
            if not ok(v):
                wrong.append(f"{expr} = {v}")
        assert not wrong, "metrics that did not move as expected:\n" + "\n".join(wrong)
        print(f"\nreal scrape: drift alert expression true {drift_seen_after:.0f}s after start; "
              f"{len(dashboard_queries())} dashboard queries, {len(rules)} rules checked")
    finally:
        producer.stop.set()
        if producing.is_alive():
            producing.join(40)
        for p in processes:
            p.stop()
        prometheus.stop()


# =============================================================================================
# A birth: the novelty share against a real Prometheus
# =============================================================================================
# Far from every demo profile (twice the champions' spend and more, daily sessions): a population
# the model has no segment for.
NEWBORN = Profile("wholesale buyers", (1, 90, 30000, 330, 120, 60), (("web", 1.0),))


def produce_population(
    settings: Settings, people: list[Customer], prefix: str, seed: int,
) -> list[CustomerEvent]:
    """One event per customer; returns the events as the consumer decodes them."""
    rng = np.random.default_rng(seed)
    values = [event_value(c, rng, f"{prefix}-{i}") for i, c in enumerate(people)]
    produce_raw(settings, [(str(v["customer_id"]), json.dumps(v).encode()) for v in values])
    return [CustomerEvent.model_validate(v) for v in values]


def model_with_radii(settings: Settings, events: list[CustomerEvent], k: int = 5) -> ModelBundle:
    """A model of ``events`` fitted here, so that the test does not depend on how the trainer
    fits: log of every feature, standard scaling, k-means; and the training radii the trainer
    measures: per segment, the 99th percentile of its rows' distances to their centroid, and three
    times that as the outlier radius."""
    names = list(settings.features)
    plain = FeatureSpec(numeric=names, log_features=names, center=[0.0] * len(names),
                        scale=[1.0] * len(names), categorical_weight=0.5,
                        vocabulary={"channel": ["app", "web", "email", "other"]})
    logged = plain.encode_numeric(raw_numeric(events, names))
    spec = plain.model_copy(update={"center": logged.mean(axis=0).tolist(),
                                    "scale": logged.std(axis=0).tolist()})
    x, _ = spec.encode(events)
    fitted = KMeans(k, n_init=4, random_state=0).fit(x)
    index, distance, _ = nearest_two(x, fitted.cluster_centers_)
    p99 = [float(np.quantile(distance[index == i], 0.99)) for i in range(k)]
    sizes = np.bincount(index, minlength=k)
    return ModelBundle(
        version=1, features=spec, centroids=fitted.cluster_centers_.tolist(), segment_ids=list(range(k)),
        segment_names=[f"segment {i}" for i in range(k)],
        quality=Quality(silhouette=0.7, davies_bouldin=0.5, inertia=float(fitted.inertia_),
                        shares=(sizes / sizes.sum()).tolist(), sizes=sizes.tolist(),
                        radius_p99=p99, radius_outlier=[3 * r for r in p99]),
        lineage=Lineage(topic=settings.events_topic),
    )


@pytest.mark.integration
@pytest.mark.system  # a real Prometheus: the system tier (make system)
def test_a_birth_makes_the_novelty_alert_s_expression_true_in_a_real_prometheus(
    settings: Settings, store: ModelStore, tmp_path: Path
) -> None:
    need("prometheus")
    need("promtool")
    population = customers(1500)
    rng = np.random.default_rng(0)
    training = [CustomerEvent.model_validate(event_value(c, rng, f"t-{i}")) for i, c in enumerate(population)]
    bundle = model_with_radii(settings, training)
    store.publish(bundle, None)

    ports = {"consumer": free_port(), "trainer": free_port()}  # no trainer: one model throughout
    prometheus = local_prometheus(tmp_path, ports)
    with running_consumer(settings) as rc:
        server = serve(rc.metrics.registry, ports["consumer"])
        try:
            prometheus.start()
            wait_until(lambda: bool(prometheus.query(
                f'segment_model_version{{job="consumer"}} == {bundle.version}')), 60,
                "the consumer scoring with the model that has radii")
            rules = {r["name"]: r for g in prometheus.api("rules")["groups"] for r in g["rules"]}
            novelty_expr = rules["SegmentNoveltyHigh"]["query"]

            # the model's own population, with fresh per-event noise: about 1% novel, quiet
            produce_population(settings, population, "usual", seed=1)
            wait_until(lambda: bool(prometheus.query('segment_novelty_share{job="consumer"} >= 0')), 60,
                       "a novelty share of the usual traffic")
            usual = prometheus.scalar('segment_novelty_share{job="consumer"}')
            assert usual < 0.03 and not prometheus.query(novelty_expr), usual

            # a birth: 600 customers unlike every segment
            newborn = make_customers(600, np.random.default_rng(7), profiles=(NEWBORN,), prefix="born")
            produce_population(settings, newborn, "born", seed=2)
            wait_until(lambda: bool(prometheus.query(novelty_expr)), 60,
                       "the novelty alert's expression true after the birth")
            wait_until(lambda: any(a["labels"]["alertname"] == "SegmentNoveltyHigh"
                                   and a["state"] == "pending" for a in prometheus.api("alerts")["alerts"]),
                       10, "SegmentNoveltyHigh pending in Prometheus' rule evaluation")
            share = prometheus.scalar('segment_novelty_share{job="consumer"}')
            assert share > 0.2, share  # 600 of about 2,100 recent events, plus the usual 1%
            assert prometheus.scalar("sum(segment_novel_events_total)") >= 600
            assert prometheus.scalar("sum(segment_outlier_events_total)") > 0
            print(f"\nnovelty share: {usual:.3%} on the usual traffic, {share:.1%} after the birth")
        finally:
            server.shutdown()
            prometheus.stop()

"""Prometheus metrics of the cloud companion, on a dedicated registry (never the global default one, so
several services or tests in one process do not collide)."""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

__all__ = ["CONTENT_TYPE_LATEST", "CanoeMetrics", "CloudMetrics", "start_metrics_server"]


class CanoeMetrics:
    """Counters of Canoe matching (cloud/canoe.py), registered only when a CanoeCompanion runs, so a plain
    companion's /metrics carries no always-zero Canoe series."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = Counter("edgepatch_canoe_requests", "Help requests received from targets", registry=r)
        self.bad_requests = Counter("edgepatch_canoe_bad_requests", "Help requests refused (unknown classes)",
                                    registry=r)
        self.matched = Counter("edgepatch_canoe_matched", "Help requests with at least one candidate helper",
                               registry=r)
        self.no_helper = Counter("edgepatch_canoe_no_helper", "Help requests answered 'no_helper' (no candidate, "
                                 "or every candidate failed)", registry=r)
        self.helpers_tried = Counter("edgepatch_canoe_helpers_tried", "Tasks relayed to helpers", registry=r)
        self.timeouts = Counter("edgepatch_canoe_timeouts", "Helpers that did not answer in time", registry=r)
        self.helper_errors = Counter("edgepatch_canoe_helper_errors", "Helpers that answered with an error",
                                     registry=r)
        self.offers_relayed = Counter("edgepatch_canoe_offers_relayed", "Helper slices relayed to targets",
                                      registry=r)
        self.slice_bytes = Counter("edgepatch_canoe_slice_bytes", "Bytes of the slices relayed (as announced "
                                   "by the helpers' offers)", registry=r)
        self.helpers_retired = Counter("edgepatch_canoe_helpers_retired", "Helper slices the targets reported "
                                       "retired from their ensembles", registry=r)
        self.weight_reports = Counter("edgepatch_canoe_weight_reports", "Ensemble-weight reports received",
                                      registry=r)
        self.metas_refused = Counter("edgepatch_canoe_metas_refused", "Device label histograms refused (device "
                                     "not provisioned, histogram too long or counts too large, too many "
                                     "devices)", registry=r)
        self.pending = Gauge("edgepatch_canoe_pending", "Help requests waiting for a helper", registry=r)


class CloudMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages = Counter("edgepatch_ingest_messages", "Valid messages ingested, by kind",
                                ["kind"], registry=r)
        self.duplicates = Counter("edgepatch_ingest_duplicates", "Patch updates dropped as duplicates "
                                  "(same content hash already stored)", registry=r)
        self.rejects = Counter("edgepatch_ingest_rejects", "Messages refused by validation, by reason",
                               ["reason"], registry=r)
        self.devices_seen = Gauge("edgepatch_devices_seen", "Devices known to the store", registry=r)
        self.distill_runs = Counter("edgepatch_distillation_runs", "MoMoDistill runs", registry=r)
        self.distill_failures = Counter("edgepatch_distillation_failures", "Distillation rounds that failed "
                                        "(retried with exponential back-off)", registry=r)
        self.bundles_published = Counter("edgepatch_bundles_published", "Bundle versions published",
                                         registry=r)
        self.bytes_in = Counter("edgepatch_bytes_in", "Payload bytes received over MQTT", registry=r)
        self.bytes_out = Counter("edgepatch_bytes_out", "Bytes sent to devices (announcements, bundle files)",
                                 registry=r)
        self.batch_seconds = Histogram("edgepatch_ingest_commit_seconds", "Time to commit one ingest batch",
                                       buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0),
                                       registry=r)
        self.batch_size = Histogram("edgepatch_ingest_batch_size", "Messages per committed batch",
                                    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=r)
        self._canoe: CanoeMetrics | None = None
        self._canoe_lock = threading.Lock()

    def canoe(self) -> CanoeMetrics:
        """The Canoe counters, registered on first use (idempotent: one set per registry)."""
        with self._canoe_lock:
            if self._canoe is None:
                self._canoe = CanoeMetrics(self.registry)
            return self._canoe

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample (e.g. `edgepatch_ingest_rejects_total`, {'reason': 'bad_json'}); 0 if absent."""
        got = self.registry.get_sample_value(name, labels or {})
        return 0.0 if got is None else float(got)


def start_metrics_server(port: int, metrics: CloudMetrics, addr: str = "127.0.0.1") -> tuple[Any, threading.Thread]:
    """Serve /metrics alone on `port` (cloud/web.py serves it beside the dashboard instead)."""
    server, thread = start_http_server(port, addr=addr, registry=metrics.registry)
    return server, thread

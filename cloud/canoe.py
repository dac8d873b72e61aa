"""Canoe matching in the cloud companion: pick helpers for a target's help request and relay both ways.

The companion keeps what devices publish about themselves (`canoe/meta`: label histogram, optional
per-class accuracy, online flag) and answers each `canoe/request`:
1. classes outside the model's label set → an `unknown_classes` error reply to the target;
2. candidates = other devices, online, holding samples of the requested classes, ranked by Σ_{c ∈ classes}
   hist[c]·acc[c] (acc = 1 when unknown) × the share of the target's other classes they know (`context_share`);
   none → a `no_helper` reply (the target keeps learning alone). Histograms are claims: a helper that
   timed out, answered with an error or whose slice a target weighed at α <= 0 gets a strike, and helpers
   with fewer strikes are tried first (issue 11: a fake histogram made an attacker first for every request);
3. relay the task to the best candidate (`<helper>/canoe/task`); if no offer arrives within `timeout_s`
   (helper offline) or it answers with an error, try the next; when all failed, reply `no_helper`;
4. relay the offer to the target (`<target>/canoe/reply`) and count its slice bytes.

`stats` (requests, matched, helpers tried, timeouts, errors, offers relayed, slice bytes) is a plain dict;
the same counts go to the Prometheus counters of `CloudMetrics.canoe()` (pass the companion's metrics in to
share its registry and /metrics). Targets report their SAMME ensemble weights as generic `metrics`
messages (`canoe.alpha.*`, see device/canoe_target.py); the companion keeps the latest per target, names
each member by the relay it made (helper, request), and counts helpers the targets retired.

`snapshot()` (recent requests: target, classes, helpers tried, helper chosen, slice bytes, outcome; the
ensembles; the stats) is what the fleet page shows: `attach(web)` adds it to /fleet and /api/fleet.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgepatch.protocol.canoe import (
    WEIGHT_PREFIX,
    CanoeError,
    CanoeMessage,
    CanoeMeta,
    CanoeOffer,
    CanoeReply,
    CanoeRequest,
    CanoeTask,
    canoe_filter,
    check_classes,
    weight_metric_name,
)
from edgepatch.protocol.endpoint import WireEndpoint
from edgepatch.protocol.messages import Message, Metrics
from edgepatch.protocol.mqtt import MqttClient, MqttSettings, MqttVersion, make_client
from edgepatch.protocol.topics import Channel, fleet_filter

from .metrics import CloudMetrics

log = logging.getLogger("edgepatch.cloud.canoe")

MAX_CLASS_COUNT = 10**9  # a device claiming more samples of one class than this is not believed
MAX_METAS = 10_000  # devices whose histograms are kept (without provisioning, anyone could add more)
MIN_CONTEXT_SAMPLES = 5  # samples of a class a helper must hold to count as knowing it (context_share)


def context_share(helper_hist: list[int], target_hist: list[int] | None, classes: list[int]) -> float:
    """Share of the target's other samples (its window histogram outside `classes`) whose class the helper
    holds at least `MIN_CONTEXT_SAMPLES` samples of; 1.0 without a histogram. A helper that never saw the
    target's other classes cannot tell them from the requested ones: its slice calls them requested classes
    (benchmarks/canoe.py: a helper without four of the seven old classes named a new class for half of them)."""
    others = [(c, n) for c, n in enumerate(target_hist or []) if c not in classes and n > 0]
    total = sum(n for _, n in others)
    known = sum(n for c, n in others if c < len(helper_hist) and helper_hist[c] >= MIN_CONTEXT_SAMPLES)
    return known / total if total else 1.0


def rank_helpers(metas: dict[str, CanoeMeta], classes: list[int], target: str, exclude: set[str] | None = None,
                 context: list[int] | None = None) -> list[tuple[str, float]]:
    """(device, score) of devices holding samples of `classes`, best first. Score: those samples (× claimed
    accuracy) × `context_share` of the target's window histogram `context`; ties (0) by the samples alone."""
    ranked = []
    for device, meta in metas.items():
        if device == target or not meta.online or (exclude and device in exclude):
            continue
        hist = meta.label_histogram
        acc = [min(1.0, max(0.0, a)) for a in meta.class_accuracy]  # a claim: never above 1
        raw = sum(hist[c] * (acc[c] if c < len(acc) else 1.0) for c in classes if c < len(hist))
        if raw > 0:  # one knowing none of the target's other classes is still better than no helper
            ranked.append((device, float(raw * context_share(hist, context, classes)), raw))
    return [(d, score) for d, score, _ in sorted(ranked, key=lambda r: (-r[1], -r[2], r[0]))]


@dataclass
class _Pending:
    request: CanoeRequest
    target: str
    candidates: list[str]
    tried: list[str] = field(default_factory=list)
    timer: threading.Timer | None = None
    record: dict[str, Any] = field(default_factory=dict)  # the entry shown on the fleet page


class _SectionHost(Protocol):
    def add_section(self, key: str, data: Any, html_view: Any = None) -> None: ...


class CanoeCompanion:
    def __init__(self, fleet: str, host: str, port: int, num_classes: int, *, cloud_id: str = "cloud",
                 timeout_s: float = 5.0, variant_id: str = "", metrics: CloudMetrics | None = None,
                 protocol: MqttVersion | str = MqttVersion.V5, history: int = 50,
                 settings: MqttSettings | None = None, client: MqttClient | None = None,
                 known: Callable[[str, str], bool] | None = None, max_metas: int = MAX_METAS) -> None:
        """`known(fleet, device_id)`: with provisioning on, histograms only from provisioned devices (the
        broker's ACL makes the topic's device id the sender's login); `max_metas` bounds how many are kept."""
        self.fleet, self.num_classes, self.timeout_s, self.variant_id = fleet, num_classes, timeout_s, variant_id
        self.known, self.max_metas = known, max_metas
        self.metas: dict[str, CanoeMeta] = {}
        self.stats: dict[str, Any] = {"requests": 0, "matched": 0, "helpers_tried": 0, "timeouts": 0,
                                      "helper_errors": 0, "bad_requests": 0, "no_helper": 0, "offers_relayed": 0,
                                      "slice_bytes": 0, "helpers_retired": 0, "weight_reports": 0,
                                      "metas_refused": 0,
                                      "by_target": {}}
        self.counters = (metrics or CloudMetrics()).canoe()
        self.recent: deque[dict[str, Any]] = deque(maxlen=history)  # newest last
        self.ensembles: dict[str, dict[str, Any]] = {}  # target -> latest reported weights
        self._members: dict[str, dict[str, Any]] = {}  # weight metric name -> {helper, request_id, ...}
        self._pending: dict[str, _Pending] = {}
        # Histograms are claims (a device may publish any on its own meta topic): a helper that timed out,
        # answered with an error, or whose slice a target weighed at α <= 0 gets a strike, and helpers
        # with fewer strikes are tried first, so a device claiming every class is first at most once.
        self.strikes: dict[str, int] = {}
        self._struck: set[str] = set()  # members already counted
        self._lock = threading.Lock()
        if client is None:
            settings = settings or MqttSettings(host=host, port=port, version=protocol,
                                                client_id=f"edgepatch-canoe-companion-{fleet}")
            client = make_client(settings)
        self.link = WireEndpoint(client, fleet=fleet, device_id=cloud_id)
        self.link.subscribe(canoe_filter(fleet, "meta"), self._on_meta)
        self.link.subscribe(canoe_filter(fleet, "request"), self._on_request)
        self.link.subscribe(canoe_filter(fleet, "offer"), self._on_offer)
        self.link.subscribe(fleet_filter(fleet, Channel.METRICS), self._on_metrics)

    def _count(self, key: str, amount: int = 1) -> None:
        """stats[key] and its Prometheus counter together (caller holds the lock)."""
        self.stats[key] += amount
        getattr(self.counters, key).inc(amount)  # same names as the stats keys

    def _finish(self, record: dict[str, Any], outcome: str, **fields: Any) -> None:
        """Close a request's fleet-page entry (caller holds the lock)."""
        record.update(outcome=outcome, finished_at=time.time(), **fields)
        self.counters.pending.set(len(self._pending))

    def start(self, timeout: float = 10.0) -> None:
        self.link.start(timeout)

    def stop(self) -> None:
        with self._lock:
            for pending in self._pending.values():
                if pending.timer:
                    pending.timer.cancel()
            self._pending.clear()
        self.link.stop()

    # -- handlers (MQTT client thread) -----------------------------------------------------------------
    def _on_meta(self, msg: CanoeMessage) -> None:
        meta = msg.payload
        if not isinstance(meta, CanoeMeta):
            return
        why = self._meta_refusal(msg.device_id, meta)
        with self._lock:
            if why is None and msg.device_id not in self.metas and len(self.metas) >= self.max_metas:
                why = f"already {self.max_metas} devices' histograms kept"
            if why is not None:
                self._count("metas_refused")
            else:
                self.metas[msg.device_id] = meta
        if why is not None:
            log.warning("canoe histogram of %s refused: %s", msg.device_id, why)

    def _meta_refusal(self, device_id: str, meta: CanoeMeta) -> str | None:
        if self.known is not None and not self.known(self.fleet, device_id):
            return "not a provisioned device"
        if len(meta.label_histogram) > self.num_classes or len(meta.class_accuracy) > self.num_classes:
            return f"{len(meta.label_histogram)} histogram entries for a model of {self.num_classes} classes"
        if any(c > MAX_CLASS_COUNT for c in meta.label_histogram):
            return f"a class count above {MAX_CLASS_COUNT}"
        return None

    def _on_request(self, msg: CanoeMessage) -> None:
        request = msg.payload
        if not isinstance(request, CanoeRequest):
            return
        target = msg.device_id
        with self._lock:
            if request.request_id in self._pending:
                return  # a duplicate delivery (QoS 1)
            self._count("requests")
            per = self.stats["by_target"].setdefault(target, {"requests": 0, "slices": 0, "slice_bytes": 0})
            per["requests"] += 1
            record: dict[str, Any] = {
                "request_id": request.request_id, "target": target, "classes": list(request.classes),
                "reason": request.reason, "window_accuracy": round(request.window_accuracy, 4),
                "received_at": time.time(), "helpers_tried": [], "helper": None, "slice_bytes": 0,
                "outcome": "pending", "error": "", "timeouts": 0}
            self.recent.append(record)
        log.info("canoe: request %s from %s for classes %s (%s, window accuracy %.3f)", request.request_id, target,
                 request.classes, request.reason or "no reason", request.window_accuracy)
        try:
            classes = check_classes(request.classes, self.num_classes)
        except CanoeError as exc:
            with self._lock:
                self._count("bad_requests")
                self._finish(record, "unknown_classes", error=str(exc))
            self._reply(target, CanoeReply(request.request_id, error=f"unknown_classes: {exc}"))
            return
        with self._lock:
            candidates = sorted((d for d, _ in rank_helpers(self.metas, classes, target,
                                                            context=list(request.label_histogram))),
                                key=lambda d: self.strikes.get(d, 0))  # stable: score order within a tier
        if not candidates:
            error = f"no online device has samples of classes {classes}"
            with self._lock:
                self._count("no_helper")
                self._finish(record, "no_helper", error=error)
            self._reply(target, CanoeReply(request.request_id, error=f"no_helper: {error}"))
            return
        pending = _Pending(CanoeRequest(request.request_id, classes, request.label_histogram,
                                        request.window_accuracy, request.reference_accuracy, request.reason),
                           target, candidates, record=record)
        with self._lock:
            self._pending[request.request_id] = pending
            self._count("matched")
            self.counters.pending.set(len(self._pending))
        self._try_next(request.request_id)

    def _try_next(self, request_id: str) -> None:
        with self._lock:
            pending = self._pending.get(request_id)
            if pending is None:
                return
            if pending.timer:
                pending.timer.cancel()
            left = [c for c in pending.candidates if c not in pending.tried]
            if not left:
                del self._pending[request_id]
                self._count("no_helper")
                self._finish(pending.record, "no_helper", error=f"tried {pending.tried}, none answered with a slice")
            else:
                helper = left[0]
                pending.tried.append(helper)
                pending.record["helpers_tried"] = list(pending.tried)
                self._count("helpers_tried")
                pending.timer = threading.Timer(self.timeout_s, self._timed_out, args=(request_id, helper))
                pending.timer.daemon = True
                pending.timer.start()
        if not left:
            self._reply(pending.target, CanoeReply(request_id, error=f"no_helper: tried {pending.tried}, "
                                                                     "none answered with a slice"))
            return
        log.info("canoe: request %s of %s -> helper %s", request_id, pending.target, helper)
        task = CanoeTask(request_id, pending.target, pending.request.classes, self.variant_id)
        self.link.send(task, to=helper)

    def _timed_out(self, request_id: str, helper: str) -> None:
        with self._lock:
            pending = self._pending.get(request_id)
            if pending is None or pending.tried[-1] != helper:
                return
            self._count("timeouts")
            pending.record["timeouts"] = pending.record.get("timeouts", 0) + 1
            self.strikes[helper] = self.strikes.get(helper, 0) + 1
        log.warning("canoe: helper %s did not answer %s within %.1f s; trying the next", helper, request_id,
                    self.timeout_s)
        self._try_next(request_id)

    def _on_offer(self, msg: CanoeMessage) -> None:
        offer = msg.payload
        if not isinstance(offer, CanoeOffer) or offer.helper != msg.device_id:
            return
        with self._lock:
            pending = self._pending.get(offer.request_id)
            if pending is None or not pending.tried or pending.tried[-1] != msg.device_id:
                return  # late answer from a helper we already gave up on, or unknown request
            if not offer.ok:
                self._count("helper_errors")
                self.strikes[msg.device_id] = self.strikes.get(msg.device_id, 0) + 1
            else:
                if pending.timer:
                    pending.timer.cancel()
                del self._pending[offer.request_id]
                self._count("offers_relayed")
                self._count("slice_bytes", offer.size)
                per = self.stats["by_target"].setdefault(pending.target,
                                                         {"requests": 0, "slices": 0, "slice_bytes": 0})
                per["slices"] += 1
                per["slice_bytes"] += offer.size
                self._finish(pending.record, "relayed", helper=offer.helper, slice_bytes=offer.size,
                             by="inline" if offer.inline_b64 else "reference")
                member = f"{offer.helper}/{offer.request_id}"
                self._members[weight_metric_name(member)] = {
                    "member": member, "helper": offer.helper, "request_id": offer.request_id,
                    "classes": list(pending.request.classes), "slice_bytes": offer.size}
        if not offer.ok:
            log.warning("canoe: helper %s could not serve %s: %s", msg.device_id, offer.request_id, offer.error)
            self._try_next(offer.request_id)
            return
        log.info("canoe: relayed %d-byte slice of %s for %s to %s", offer.size, offer.helper, offer.request_id,
                 pending.target)
        self._reply(pending.target, CanoeReply(offer.request_id, offer=offer))

    def _reply(self, target: str, reply: CanoeReply) -> None:
        self.link.send(reply, to=target)

    def _on_metrics(self, msg: Message) -> None:
        """A device's metrics: keep its Canoe ensemble (α per member) if it reports one."""
        if not isinstance(msg.payload, Metrics):
            return
        values = dict(msg.payload.values)
        alphas = {k: v for k, v in values.items() if k.startswith(WEIGHT_PREFIX)}
        if not alphas:
            return  # not a Canoe target's report
        with self._lock:
            members = []
            for name, alpha in sorted(alphas.items(), key=lambda kv: (kv[0] != weight_metric_name("own"), kv[0])):
                known = self._members.get(name, {})
                if known.get("helper") and alpha <= 0 and name not in self._struck:  # the target found it useless
                    self._struck.add(name)
                    self.strikes[known["helper"]] = self.strikes.get(known["helper"], 0) + 1
                members.append({"metric": name, "member": "own" if name == weight_metric_name("own")
                                else known.get("member", name[len(WEIGHT_PREFIX):]),
                                "helper": known.get("helper"), "request_id": known.get("request_id"),
                                "classes": known.get("classes"), "slice_bytes": known.get("slice_bytes"),
                                "alpha": alpha})
            previous = self.ensembles.get(msg.device_id)
            if previous is not None and msg.sent_at < previous["sent_at"]:
                return  # a late redelivery of an older report
            retired = int(values.get("canoe.retired", 0))
            newly_retired = max(0, retired - (previous["retired"] if previous else 0))
            self._count("weight_reports")
            if newly_retired:
                self._count("helpers_retired", newly_retired)
            self.ensembles[msg.device_id] = {
                "target": msg.device_id, "members": members, "retired": retired,
                "slice_bytes_received": int(values.get("canoe.slice_bytes_received", 0)),
                "sent_at": msg.sent_at, "received_at": time.time()}
        log.info("canoe: %s reports ensemble weights %s (retired %d)", msg.device_id,
                 {m["member"]: round(m["alpha"], 4) for m in members}, retired)

    # -- fleet page --------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Recent requests (newest first), the targets' ensembles and the counters, JSON-ready."""
        with self._lock:
            stats = {k: v for k, v in self.stats.items() if k != "by_target"}
            return {"fleet": self.fleet, "stats": stats,
                    "by_target": {t: dict(v) for t, v in self.stats["by_target"].items()},
                    "pending": len(self._pending),
                    "requests": [dict(r, classes=list(r["classes"]), helpers_tried=list(r["helpers_tried"]))
                                 for r in reversed(self.recent)],
                    "ensembles": {t: {**e, "members": [dict(m) for m in e["members"]]}
                                  for t, e in sorted(self.ensembles.items())},
                    "helpers_known": sorted(d for d, m in self.metas.items() if m.online)}

    def attach(self, web: _SectionHost, key: str = "canoe") -> None:
        """Show this companion on a FleetWeb (`/fleet` section and `/api/fleet[key]`)."""
        web.add_section(key, self.snapshot, canoe_html)


def canoe_html(data: dict[str, Any]) -> str:
    """The fleet page's Canoe section (everything escaped)."""
    e = html.escape

    def cell(v: Any) -> str:
        return f"<td>{e('' if v is None else str(v))}</td>"

    stats = data.get("stats", {})
    requests = "\n".join(
        "<tr>" + "".join(cell(v) for v in (
            r["request_id"], r["target"], ",".join(map(str, r["classes"])), r["reason"],
            " → ".join(r["helpers_tried"]), r["helper"] or "", r["slice_bytes"], r["outcome"], r["error"])) + "</tr>"
        for r in data.get("requests", []))
    ensembles = "\n".join(
        "<tr>" + "".join(cell(v) for v in (
            target, m["member"], m["helper"] or ("(own model)" if m["member"] == "own" else ""),
            f"{m['alpha']:.4f}", "" if m["slice_bytes"] is None else m["slice_bytes"], ens["retired"])) + "</tr>"
        for target, ens in data.get("ensembles", {}).items() for m in ens["members"])
    counts = ", ".join(f"{e(k.replace('_', ' '))}: {e(str(v))}" for k, v in stats.items())
    return f"""<h2>Canoe</h2>
<p>{counts}. Pending: {e(str(data.get('pending', 0)))}.</p>
<h3>Recent help requests</h3>
<table class="canoe-requests"><thead><tr><th>request</th><th>target</th><th>classes</th><th>reason</th>
<th>helpers tried</th><th>helper</th><th>slice bytes</th><th>outcome</th><th>error</th></tr></thead>
<tbody>
{requests}
</tbody></table>
<h3>Ensemble weights (SAMME α)</h3>
<table class="canoe-ensembles"><thead><tr><th>target</th><th>member</th><th>helper</th><th>α</th>
<th>slice bytes</th><th>retired</th></tr></thead>
<tbody>
{ensembles}
</tbody></table>"""

"""Canoe matching in the cloud companion: pick helpers for a target's help request and relay both ways.

The companion keeps what devices publish about themselves (`canoe/meta`: label histogram, optional
per-class accuracy, online flag) and answers each `canoe/request`:
1. classes outside the model's label set → an `unknown_classes` error reply to the target;
2. candidates = other devices, online, holding samples of the requested classes, ranked by
   Σ_{c ∈ classes} hist[c] · acc[c] (acc = 1 when unknown), i.e. who has seen most of what is missing;
   none → a `no_helper` reply (the target keeps learning alone);
3. relay the task to the best candidate (`<helper>/canoe/task`); if no offer arrives within `timeout_s`
   (helper offline) or it answers with an error, try the next; when all failed, reply `no_helper`;
4. relay the offer to the target (`<target>/canoe/reply`) and count its slice bytes.

`stats` (requests, matched, helpers tried, timeouts, errors, offers relayed, slice bytes, last weights)
is a plain dict a metrics exporter can read.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from edgepatch.device.canoe_target import CanoeLink
from edgepatch.protocol.canoe import (
    CanoeError,
    CanoeMessage,
    CanoeMeta,
    CanoeOffer,
    CanoeReply,
    CanoeRequest,
    CanoeTask,
    canoe_filter,
    canoe_topic,
    check_classes,
)

log = logging.getLogger("edgepatch.cloud.canoe")


def rank_helpers(metas: dict[str, CanoeMeta], classes: list[int], target: str, exclude: set[str] | None = None
                 ) -> list[tuple[str, float]]:
    """(device, score) of devices that can help with `classes`, best first (score > 0 only)."""
    ranked = []
    for device, meta in metas.items():
        if device == target or not meta.online or (exclude and device in exclude):
            continue
        hist = meta.label_histogram
        acc = meta.class_accuracy
        score = sum(hist[c] * (acc[c] if c < len(acc) else 1.0) for c in classes if c < len(hist))
        if score > 0:
            ranked.append((device, float(score)))
    return sorted(ranked, key=lambda r: (-r[1], r[0]))


@dataclass
class _Pending:
    request: CanoeRequest
    target: str
    candidates: list[str]
    tried: list[str] = field(default_factory=list)
    timer: threading.Timer | None = None


class CanoeCompanion:
    def __init__(self, fleet: str, host: str, port: int, num_classes: int, *, cloud_id: str = "cloud",
                 timeout_s: float = 5.0, variant_id: str = "") -> None:
        self.fleet, self.num_classes, self.timeout_s, self.variant_id = fleet, num_classes, timeout_s, variant_id
        self.metas: dict[str, CanoeMeta] = {}
        self.stats: dict[str, Any] = {"requests": 0, "matched": 0, "helpers_tried": 0, "timeouts": 0,
                                      "helper_errors": 0, "bad_requests": 0, "no_helper": 0, "offers_relayed": 0,
                                      "slice_bytes": 0, "by_target": {}}
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self.link = CanoeLink(fleet, cloud_id, host, port, client_id=f"edgepatch-canoe-companion-{fleet}")
        self.link.subscribe(canoe_filter(fleet, "meta"), self._on_meta)
        self.link.subscribe(canoe_filter(fleet, "request"), self._on_request)
        self.link.subscribe(canoe_filter(fleet, "offer"), self._on_offer)

    def start(self, timeout: float = 10.0) -> None:
        self.link.start(timeout)

    def stop(self) -> None:
        with self._lock:
            for pending in self._pending.values():
                if pending.timer:
                    pending.timer.cancel()
            self._pending.clear()
        self.link.stop()

    # -- handlers (paho thread) --------------------------------------------------------------------
    def _on_meta(self, msg: CanoeMessage) -> None:
        if isinstance(msg.payload, CanoeMeta):
            with self._lock:
                self.metas[msg.device_id] = msg.payload

    def _on_request(self, msg: CanoeMessage) -> None:
        request = msg.payload
        if not isinstance(request, CanoeRequest):
            return
        target = msg.device_id
        with self._lock:
            self.stats["requests"] += 1
            per = self.stats["by_target"].setdefault(target, {"requests": 0, "slices": 0, "slice_bytes": 0})
            per["requests"] += 1
            if request.request_id in self._pending:
                return  # a duplicate delivery (QoS 1)
        try:
            classes = check_classes(request.classes, self.num_classes)
        except CanoeError as exc:
            with self._lock:
                self.stats["bad_requests"] += 1
            self._reply(target, CanoeReply(request.request_id, error=f"unknown_classes: {exc}"))
            return
        with self._lock:
            candidates = [d for d, _ in rank_helpers(self.metas, classes, target)]
        if not candidates:
            with self._lock:
                self.stats["no_helper"] += 1
            self._reply(target, CanoeReply(request.request_id,
                                           error=f"no_helper: no online device has samples of classes {classes}"))
            return
        pending = _Pending(CanoeRequest(request.request_id, classes, request.label_histogram,
                                        request.window_accuracy, request.reference_accuracy, request.reason),
                           target, candidates)
        with self._lock:
            self._pending[request.request_id] = pending
            self.stats["matched"] += 1
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
                self.stats["no_helper"] += 1
            else:
                helper = left[0]
                pending.tried.append(helper)
                self.stats["helpers_tried"] += 1
                pending.timer = threading.Timer(self.timeout_s, self._timed_out, args=(request_id, helper))
                pending.timer.daemon = True
                pending.timer.start()
        if not left:
            self._reply(pending.target, CanoeReply(request_id, error=f"no_helper: tried {pending.tried}, "
                                                                     "none answered with a slice"))
            return
        log.info("canoe: request %s of %s -> helper %s", request_id, pending.target, helper)
        task = CanoeTask(request_id, pending.target, pending.request.classes, self.variant_id)
        self.link.publish_to(canoe_topic(self.fleet, helper, "task"), task)

    def _timed_out(self, request_id: str, helper: str) -> None:
        with self._lock:
            pending = self._pending.get(request_id)
            if pending is None or pending.tried[-1] != helper:
                return
            self.stats["timeouts"] += 1
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
                self.stats["helper_errors"] += 1
            else:
                if pending.timer:
                    pending.timer.cancel()
                del self._pending[offer.request_id]
                self.stats["offers_relayed"] += 1
                self.stats["slice_bytes"] += offer.size
                per = self.stats["by_target"].setdefault(pending.target,
                                                         {"requests": 0, "slices": 0, "slice_bytes": 0})
                per["slices"] += 1
                per["slice_bytes"] += offer.size
        if not offer.ok:
            log.warning("canoe: helper %s could not serve %s: %s", msg.device_id, offer.request_id, offer.error)
            self._try_next(offer.request_id)
            return
        self._reply(pending.target, CanoeReply(offer.request_id, offer=offer))

    def _reply(self, target: str, reply: CanoeReply) -> None:
        self.link.publish_to(canoe_topic(self.fleet, target, "reply"), reply)

"""Canoe target: drift detection on a sliding window, metadata-only help requests, taking in helper slices.

`DriftDetector` scores every labelled sample prequentially (predict first, then learn). The first
`reference` samples form the reference window; afterwards drift is declared when the last `window`
samples are at least `drop` less accurate than the reference, or when labels never seen in the reference
period show up (`min_new` samples of one of them; the request then names all of them). The request names the under-performing classes (new labels and
classes whose window accuracy is below `class_floor`) and the window's label histogram — never samples.

`CanoeTarget` keeps learning alone all the time (full-weight SGD steps on a replay of its recent data,
and `slice_steps` steps on each helper slice it holds, with the slice's variant program); a request waits
out `cooldown` unless it names a label no request named before; a helper slice that arrives (inline or by reference) is checked — sha256, base version, widths equal to a
bundle variant's, shapes — and joins the SAMME ensemble; anything wrong is logged, counted in `events`
and the target simply goes on alone.

The MQTT side is `canoe_link.CanoeLink` (re-exported here), a wire endpoint on the MQTT seam.

Observability: every Canoe step of a target (request, slice taken in or refused, no help, weights, helper
retired) is logged on `edgepatch.device.canoe` as `canoe target=<id> event=<event> key=value ...` with the
same fields as a dict in the record's `canoe` attribute (for JSON log handlers), and `weights_report()` /
`publish_weights()` send the current SAMME weights as metrics named `canoe.alpha.own` and
`canoe.alpha.<member>` (see `weight_metric_name`) plus `canoe.members`, `canoe.retired`,
`canoe.requests`, `canoe.slice_bytes_received`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgepatch.protocol.blobs import BlobError, fetch_bytes
from edgepatch.protocol.canoe import (
    MAX_SLICE_BYTES,
    WEIGHT_PREFIX,
    CanoeError,
    CanoeMessage,
    CanoeMeta,
    CanoeOffer,
    CanoeReply,
    CanoeRequest,
    check_slice_fits,
    decode_slice,
    weight_metric_name,
)
from edgepatch.protocol.variants import Variant

from .canoe_boost import CanoeEnsemble, SliceModel, TailoredModel
from .canoe_link import CanoeLink

log = logging.getLogger("edgepatch.device.canoe")
__all__ = ["WEIGHT_PREFIX", "CanoeLink", "CanoeTarget", "DriftDetector", "weight_metric_name"]


def _log_event(device_id: str, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """One structured log line: readable key=value text, and the fields as a dict in `record.canoe`."""
    text = " ".join(f"{k}={v}" for k, v in fields.items())
    log.log(level, "canoe target=%s event=%s %s", device_id, event, text,
            extra={"canoe": {"device_id": device_id, "event": event, **fields}})


# ------------------------------------------------------------------------------------------- drift

@dataclass(frozen=True)
class DriftReport:
    classes: list[int]
    new_labels: list[int]
    label_histogram: list[int]
    window_accuracy: float
    reference_accuracy: float
    reason: str


@dataclass
class DriftDetector:
    num_classes: int
    reference: int = 128
    window: int = 96
    drop: float = 0.15
    min_new: int = 3
    class_floor: float = 0.5
    _ref_correct: list[bool] = field(default_factory=list)
    _ref_labels: set[int] = field(default_factory=set)
    _recent: deque[tuple[int, bool]] = field(default_factory=deque)

    def observe(self, pred: np.ndarray, y: np.ndarray) -> None:
        for p, t in zip(pred.tolist(), y.tolist(), strict=True):
            if len(self._ref_correct) < self.reference:
                self._ref_correct.append(p == t)
                self._ref_labels.add(int(t))
            self._recent.append((int(t), p == t))
            while len(self._recent) > self.window:
                self._recent.popleft()

    def acknowledge(self, classes: list[int]) -> None:
        """Help arrived for `classes`: they no longer count as never-seen labels."""
        self._ref_labels.update(int(c) for c in classes)

    @property
    def reference_accuracy(self) -> float:
        return float(np.mean(self._ref_correct)) if self._ref_correct else float("nan")

    def check(self) -> DriftReport | None:
        if len(self._ref_correct) < self.reference or len(self._recent) < self.window // 2:
            return None
        labels = np.array([t for t, _ in self._recent])
        correct = np.array([c for _, c in self._recent])
        hist = np.bincount(labels, minlength=self.num_classes)
        acc = float(correct.mean())
        # Trigger once one never-seen label has `min_new` samples, but ask for every never-seen label so far.
        new = sorted(c for c in range(self.num_classes) if hist[c] and c not in self._ref_labels)
        if not any(hist[c] >= self.min_new for c in new):
            new = []
        weak = [c for c in range(self.num_classes)
                if hist[c] >= self.min_new and correct[labels == c].mean() < self.class_floor]
        dropped = acc <= self.reference_accuracy - self.drop
        if not new and not dropped:
            return None
        classes = sorted(set(new) | set(weak))
        if not classes:
            return None
        reason = "new labels" if new else "accuracy drop"
        return DriftReport(classes, new, hist.tolist(), acc, self.reference_accuracy, reason)


# -------------------------------------------------------------------------------------------- target

def fetch_slice(offer: CanoeOffer, max_bytes: int = MAX_SLICE_BYTES) -> bytes:
    """The offer's slice bytes: inline, or read from its reference (bounded by the announced size)."""
    if offer.inline_b64:
        return offer.slice_bytes()
    try:
        return fetch_bytes(offer.reference, max_bytes=min(max_bytes, offer.size))
    except BlobError as exc:
        raise CanoeError(f"slice reference: {exc}") from None


_request_counter = itertools.count()


@dataclass
class CanoeTarget:
    """A device that learns on its own stream and takes in helper slices when it drifts."""

    device_id: str
    model: TailoredModel
    variants: list[Variant]
    base_version: str
    detector: DriftDetector
    replay: int = 256
    cooldown: int = 64  # samples to wait after a request before the next one
    slice_steps: int = 2  # full-weight steps per learning round on each helper slice (its variant's program)
    boost_window: int = 128  # recent labelled samples the SAMME weights are fit on (≤ replay)
    seed: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    ensemble: CanoeEnsemble = field(init=False)
    slice_bytes_received: int = 0
    _x: deque[np.ndarray] = field(default_factory=deque)
    _y: deque[int] = field(default_factory=deque)
    _seen: int = 0
    _last_request_at: int | None = None
    _asked: set[int] = field(default_factory=set)  # classes named by any request so far
    _pending: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _logged_weights: dict[str, float] = field(default_factory=dict)
    requests_sent: int = 0

    def __post_init__(self) -> None:
        self.inbox: queue.Queue[CanoeReply] = queue.Queue()
        self.ensemble = CanoeEnsemble(self.model, self.model.spec.num_classes)
        self.rng = np.random.default_rng(self.seed)

    # -- data and learning -------------------------------------------------------------------------
    def observe(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Predict (ensemble) the new labelled samples first, then keep them; returns the predictions."""
        with self._lock:
            pred = self.ensemble.predict(x)
        self.detector.observe(pred, y)
        for xi, yi in zip(x, y.tolist(), strict=True):
            self._x.append(np.asarray(xi, np.float32))
            self._y.append(int(yi))
            while len(self._x) > self.replay:
                self._x.popleft()
                self._y.popleft()
        self._seen += len(y)
        return pred

    def window(self) -> tuple[np.ndarray, np.ndarray]:
        n = min(len(self._y), self.boost_window)
        return np.stack(list(self._x)[-n:]), np.asarray(list(self._y)[-n:], np.int32)

    def learn(self, steps: int) -> list[float]:
        """Full-weight steps on the replay buffer (alone), then refit the ensemble weights."""
        xs, ys = np.stack(list(self._x)), np.asarray(list(self._y), np.int32)
        losses = []
        for _ in range(steps):
            idx = self.rng.choice(len(ys), size=self.model.batch, replace=len(ys) < self.model.batch)
            losses.append(self.model.train_step(xs[idx], ys[idx]))
        with self._lock:
            helpers = list(self.ensemble.helpers)
        for helper in helpers:
            for _ in range(self.slice_steps):
                idx = self.rng.choice(len(ys), size=self.model.batch, replace=len(ys) < self.model.batch)
                with self._lock:
                    helper.train_step(xs[idx], ys[idx], self.model.lr)
        self.refit()
        return losses

    def refit(self) -> dict[str, float]:
        with self._lock:
            if not self.ensemble.helpers:
                return self.ensemble.weights()
            wx, wy = self.window()
            retired_before = len(self.ensemble.retired)
            weights = self.ensemble.refit(wx, wy)
            retired = self.ensemble.retired[retired_before:]
        for name in retired:
            self.events.append({"event": "retired", "member": name, "at_sample": self._seen})
            _log_event(self.device_id, "retired", member=name, at_sample=self._seen, members=len(weights))
        self._log_weights(weights)
        return weights

    def _log_weights(self, weights: dict[str, float], min_change: float = 0.05) -> None:
        """INFO when the members change or an α moves by `min_change` since the last INFO line (refit runs
        after every learning round: logging each one at INFO would drown the log), DEBUG otherwise."""
        last = self._logged_weights
        moved = weights.keys() != last.keys() or any(abs(a - last[n]) >= min_change for n, a in weights.items())
        level = logging.INFO if moved else logging.DEBUG
        if moved:
            self._logged_weights = dict(weights)
        if log.isEnabledFor(level):
            _log_event(self.device_id, "weights", level, weights=weights, at_sample=self._seen)

    def weights_report(self) -> dict[str, float]:
        """The ensemble's state as metric values (names: see the module docstring)."""
        with self._lock:
            weights = self.ensemble.weights()
            retired = len(self.ensemble.retired)
        values = {weight_metric_name(name): float(a) for name, a in weights.items()}
        values.update({"canoe.members": float(len(weights)), "canoe.retired": float(retired),
                       "canoe.requests": float(self.requests_sent),
                       "canoe.slice_bytes_received": float(self.slice_bytes_received)})
        return values

    def publish_weights(self, link: CanoeLink) -> int:
        """Send `weights_report()` as a metrics message (the companion records it); returns the bytes sent."""
        return link.publish_metrics(self.weights_report(), base_version=self.base_version,
                                    variant_id=self.model.full_vid)

    def accuracy(self, x: np.ndarray, y: np.ndarray, own_only: bool = False) -> float:
        if own_only:
            pred = self.model.logits(x).argmax(axis=1)
        else:
            with self._lock:
                pred = self.ensemble.predict(x)
        return float((pred == y).mean())

    # -- requests ----------------------------------------------------------------------------------
    def meta(self) -> CanoeMeta:
        hist = np.bincount(np.asarray(list(self._y), np.int64), minlength=self.model.spec.num_classes)
        return CanoeMeta(hist.tolist())

    def maybe_request(self) -> CanoeRequest | None:
        """A help request when drift is detected (none while one is pending or in the cooldown)."""
        if self._pending is not None:
            return None
        report = self.detector.check()
        if report is None:
            return None
        # The cooldown holds back repeated requests for the same trouble; a label no request has named yet
        # is asked for at once (a helper slice is an expert for the classes it was cut for only).
        unasked = set(report.new_labels) - self._asked
        if not unasked and self._last_request_at is not None and self._seen - self._last_request_at < self.cooldown:
            return None
        self._asked.update(report.classes)
        request_id = f"{self.device_id}-r{next(_request_counter)}-{self._seen}"
        self._pending, self._last_request_at = request_id, self._seen
        self.events.append({"event": "request", "request_id": request_id, "classes": report.classes,
                            "reason": report.reason, "at_sample": self._seen,
                            "window_accuracy": report.window_accuracy})
        self.requests_sent += 1
        _log_event(self.device_id, "request", request_id=request_id, classes=report.classes, reason=report.reason,
                   window_accuracy=round(report.window_accuracy, 4),
                   reference_accuracy=round(report.reference_accuracy, 4), at_sample=self._seen)
        return CanoeRequest(request_id, report.classes, report.label_histogram, report.window_accuracy,
                            report.reference_accuracy if np.isfinite(report.reference_accuracy) else 0.0,
                            report.reason)

    def on_reply(self, reply: CanoeReply) -> bool:
        """Take a relayed offer into the ensemble. False (logged, counted) when it cannot be used."""
        if reply.offer is not None and reply.request_id != self._pending:
            # only an answer to our own pending request joins the ensemble: nobody can push a slice in
            self.events.append({"event": "unrequested", "request_id": reply.request_id,
                                "helper": reply.offer.helper})
            _log_event(self.device_id, "unrequested", logging.WARNING, request_id=reply.request_id,
                       pending=self._pending, next="ignored")
            return False
        if reply.request_id == self._pending:
            self._pending = None
        if reply.offer is None or not reply.offer.ok:
            error = reply.error or (reply.offer.error if reply.offer else "empty reply")
            self.events.append({"event": "error", "request_id": reply.request_id, "error": error})
            _log_event(self.device_id, "no_help", logging.WARNING, request_id=reply.request_id, error=repr(error),
                       next="learning alone")
            return False
        return self.accept_offer(reply.offer)

    def accept_offer(self, offer: CanoeOffer) -> bool:
        spec, patch = self.model.spec, self.model.patch
        try:
            blob = fetch_slice(offer)
            s = decode_slice(blob, expected_sha256=offer.sha256)
            variant = next((v for v in self.variants if v.id == s.variant_id), None)
            if variant is None:
                raise CanoeError(f"slice variant {s.variant_id!r} is not in this device's bundle")
            check_slice_fits(s, spec, patch, variant, self.base_version)
        except (CanoeError, OSError) as exc:
            self.events.append({"event": "rejected", "request_id": offer.request_id, "helper": offer.helper,
                                "error": str(exc)})
            _log_event(self.device_id, "rejected", logging.WARNING, request_id=offer.request_id,
                       helper=offer.helper, error=repr(str(exc)), next="learning alone")
            return False
        member = SliceModel.from_slice(s, self.model.engine, spec, patch, self.model.shared, nbytes=len(blob))
        with self._lock:
            self.ensemble.add(member)
        self.slice_bytes_received += len(blob)
        self.detector.acknowledge(s.classes)
        self.events.append({"event": "slice", "request_id": offer.request_id, "helper": offer.helper,
                            "bytes": len(blob), "variant": s.variant_id})
        _log_event(self.device_id, "slice", request_id=offer.request_id, helper=offer.helper, bytes=len(blob),
                   variant=s.variant_id, classes=s.classes, member=member.name,
                   by="inline" if offer.inline_b64 else "reference")
        self.refit()
        return True

    def adopt_full_model(self, base: dict[str, np.ndarray], helper: str, classes: list[int], nbytes: int) -> None:
        """The full-transfer baseline: replace the own weights by a helper's whole model, then fine-tune."""
        self.model.base = {k: np.array(v, np.float32) for k, v in base.items()}
        self._pending = None
        self.detector.acknowledge(classes)
        self.events.append({"event": "full_model", "helper": helper, "bytes": nbytes})

    def on_message(self, msg: CanoeMessage) -> None:
        """Link handler for `<self>/canoe/reply`: only queued here (the MQTT client's thread); the learning loop
        takes replies in with `poll_replies`, so the interpreter is never used from two threads."""
        if isinstance(msg.payload, CanoeReply):
            self.inbox.put(msg.payload)

    def poll_replies(self) -> int:
        """Handle every queued reply; returns how many slices joined the ensemble."""
        joined = 0
        while True:
            try:
                reply = self.inbox.get_nowait()
            except queue.Empty:
                return joined
            joined += int(self.on_reply(reply))

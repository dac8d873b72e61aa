"""A drifting Canoe target fed its stream tick by tick (prequential: predict, then learn), asking peers for
help and reporting its ensemble weights; the summary `edgepatch device canoe target` prints and writes."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from .canoe_target import CanoeLink, CanoeTarget


@dataclass(frozen=True)
class StreamSettings:
    steps_per_tick: int
    ticks: int
    samples_per_tick: int = 16
    wait_for_help: float = 0.0  # seconds to block for a reply after a request (0 = keep learning at once)
    report_every: int = 5  # ticks between weight reports (also right after a slice joins and at the end)

    def __post_init__(self) -> None:
        for name in ("steps_per_tick", "ticks", "samples_per_tick", "report_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.wait_for_help < 0:
            raise ValueError(f"--wait-for-help must be >= 0, got {self.wait_for_help}")


def _wait_for_reply(target: CanoeTarget, seconds: float, stop: threading.Event) -> None:
    deadline = time.monotonic() + seconds
    while target.inbox.empty() and time.monotonic() < deadline and not stop.is_set():
        time.sleep(0.02)


def run_stream(target: CanoeTarget, link: CanoeLink, x: np.ndarray, y: np.ndarray, t: np.ndarray,
               settings: StreamSettings, stop: threading.Event | None = None,
               on_tick: Any = None) -> dict[str, Any]:
    """Replay (x, y, t) (sorted by t) through `target` tick by tick; returns the run summary."""
    stop = stop or threading.Event()
    num_classes = target.model.spec.num_classes
    recent: deque[bool] = deque(maxlen=target.detector.window)
    curve: list[dict[str, Any]] = []
    bytes_sent = reports = 0
    started = time.perf_counter()
    for tick in range(settings.ticks):
        begin = tick * settings.samples_per_tick
        if begin >= len(y) or stop.is_set():
            break
        xb, yb = x[begin:begin + settings.samples_per_tick], y[begin:begin + settings.samples_per_tick]
        own_pred = target.model.logits(xb).argmax(axis=1)  # the own model alone, for comparison
        pred = target.observe(xb, yb)  # predict first (prequential), then keep the samples
        recent.extend((pred == yb).tolist())
        losses = target.learn(settings.steps_per_tick)
        joined = target.poll_replies()
        request = target.maybe_request()
        if request is not None:
            bytes_sent += link.publish("request", request)
            if settings.wait_for_help:
                _wait_for_reply(target, settings.wait_for_help, stop)
                joined += target.poll_replies()
        last = begin + len(yb) >= len(y) or tick == settings.ticks - 1
        if joined or (target.ensemble.helpers and (tick + 1) % settings.report_every == 0) or last:
            bytes_sent += target.publish_weights(link)
            reports += 1
        correct = pred == yb
        point = {
            "tick": tick, "samples": begin + len(yb), "t": float(t[begin + len(yb) - 1]),
            "accuracy": float(correct.mean()), "own_accuracy": float((own_pred == yb).mean()),
            "window_accuracy": float(np.mean(recent)), "loss": float(np.mean(losses)),
            "members": len(target.ensemble.weights()), "weights": target.ensemble.weights(),
            "class_total": np.bincount(yb, minlength=num_classes).tolist(),
            "class_correct": np.bincount(yb[correct], minlength=num_classes).tolist(),
            "request": request.request_id if request is not None else None, "slices_joined": joined,
            "bytes_received": target.slice_bytes_received,
        }
        curve.append(point)
        if on_tick is not None:
            on_tick(point)
    return summarize(target, curve, bytes_sent, reports, settings, time.perf_counter() - started)


def _accuracy_on(curve: list[dict[str, Any]], classes: list[int]) -> tuple[float | None, int]:
    total = sum(p["class_total"][c] for p in curve for c in classes)
    right = sum(p["class_correct"][c] for p in curve for c in classes)
    return (right / total if total else None), total


def drifted_accuracy(curve: list[dict[str, Any]], classes: list[int]) -> dict[str, Any]:
    """Prequential accuracy on `classes` from their first appearance until help arrived (`before_help`,
    including the tick a slice joined: its predictions were made before) and after it (`after_help`)."""
    first = next((p["tick"] for p in curve if any(p["class_total"][c] for c in classes)), None)
    helped = next((p["tick"] for p in curve if p["slices_joined"]), None)
    out: dict[str, Any] = {"classes": classes, "first_seen_tick": first, "help_tick": helped}
    if first is None:
        return out
    end = helped if helped is not None else curve[-1]["tick"]
    out["before_help"], out["before_help_samples"] = _accuracy_on([p for p in curve if first <= p["tick"] <= end],
                                                                  classes)
    if helped is not None:
        after = [p for p in curve if p["tick"] > helped]
        out["after_help"], out["after_help_samples"] = _accuracy_on(after, classes)
        out["after_help_ticks"] = len(after)
    return out


def summarize(target: CanoeTarget, curve: list[dict[str, Any]], bytes_sent: int, reports: int,
              settings: StreamSettings, seconds: float) -> dict[str, Any]:
    events = target.events
    requests = [e for e in events if e["event"] == "request"]
    slices = [e for e in events if e["event"] == "slice"]
    requested = sorted({c for e in requests for c in e["classes"]})
    samples = curve[-1]["samples"] if curve else 0
    return {
        "device_id": target.device_id, "base_version": target.base_version, "samples": samples,
        "ticks": len(curve), "steps_per_tick": settings.steps_per_tick,
        "samples_per_tick": settings.samples_per_tick, "seconds": round(seconds, 3),
        "requests": requests, "answered": len(slices), "slices": slices,
        "errors": [e for e in events if e["event"] in ("error", "rejected")],
        "helpers": sorted({e["helper"] for e in slices}), "retired": list(target.ensemble.retired),
        "final_weights": target.ensemble.weights(), "final_members": len(target.ensemble.weights()),
        "bytes_received": target.slice_bytes_received, "bytes_sent": bytes_sent, "weight_reports": reports,
        "accuracy": float(np.average([p["accuracy"] for p in curve],
                                     weights=[sum(p["class_total"]) for p in curve])) if curve else None,
        "final_window_accuracy": curve[-1]["window_accuracy"] if curve else None,
        "drifted": drifted_accuracy(curve, requested) if requested else None,
        "curve": curve,
    }

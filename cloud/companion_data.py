"""What the companion distils on: `--data`/`--proxy` checked against the bundle at start-up, which
aggregators can run on them, and the distillation part of the fleet page."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from edgepatch.protocol.bundle import load_bundle

from .distill.contributions import CloudData

if TYPE_CHECKING:
    from .companion import CompanionConfig


class CompanionError(ValueError):
    """A configuration the companion cannot serve (bad data, an aggregator that can never run)."""


def load_cloud_data(cfg: CompanionConfig) -> tuple[CloudData, str]:
    """`--data` / `--proxy` checked against the first bundle's input spec and labels; a one-line
    `CompanionError` (naming the file and the expected shape) when they do not fit."""
    from edgepatch.data.byo import DataError, load_labelled, load_unlabelled

    with load_bundle(cfg.bundle) as bundle:
        shape, classes = tuple(bundle.manifest.input.shape), bundle.manifest.labels.num_classes
    try:
        labelled = load_labelled(cfg.data, shape, classes) if cfg.data is not None else None
        proxy = load_unlabelled(cfg.proxy, shape) if cfg.proxy is not None else None
    except DataError as exc:
        raise CompanionError(f"{exc} (bundle {cfg.bundle})") from exc
    if proxy is None and labelled is not None:
        proxy = labelled.x  # the labelled inputs double as the proxy set
    parts = [f"{len(labelled)} labelled samples from {cfg.data}"] if labelled is not None else []
    if cfg.proxy is not None and proxy is not None:
        parts.append(f"{len(proxy)} proxy samples from {cfg.proxy}")
    return (CloudData(x=labelled.x if labelled else None, y=labelled.y if labelled else None, proxy_x=proxy),
            "; ".join(parts) or "no data")


_NEED_TEXT = {"labelled": "labelled data (--data)", "proxy": "an unlabelled proxy set (--proxy or --data)",
              "device_samples": "samples uploaded by the devices, which `edgepatch device run` never sends "
                                "(use --mode proxy)"}


def distill_blocker(cfg: CompanionConfig, cloud: CloudData, mode: str) -> str | None:
    """None when the configured aggregator can run on the data given; else one line saying what it needs
    and which aggregators can run. Automatic rounds (`distill_after` > 0) that could never run are refused."""
    from edgepatch.cloud.momodistill import AGGREGATORS, missing_data

    have = {name for name, value in (("labelled", cloud.x), ("proxy", cloud.proxy_x)) if value is not None}
    try:
        missing = missing_data(cfg.aggregator, mode, have)
    except ValueError as exc:
        raise CompanionError(str(exc)) from exc
    if not missing:
        return None
    runnable = [name for name in AGGREGATORS if not missing_data(name, mode, have)]
    text = (f"aggregator {cfg.aggregator!r} (mode {mode!r}) needs {' and '.join(_NEED_TEXT[m] for m in missing)}; "
            f"with {'the data given' if have else 'no data'} these can run: {', '.join(runnable) or 'none'} "
            "(--aggregator)")
    if cfg.distill_after > 0:
        raise CompanionError(f"cannot distil automatically: {text}")
    return f"no distillation: {text}"


def distill_html(status: dict[str, Any]) -> str:
    e = html.escape
    lines = [f"Aggregator {e(status['aggregator'])} (mode {e(status['mode'])}) on {e(status['data'])}.",
             f"Rounds published: {status['rounds']}. Failed rounds: {status['failures_total']}."]
    if status["blocked"]:
        lines.append(f"<strong>{e(status['blocked'])}</strong>")
    if status["last_error"]:
        lines.append(f"<strong>Last round failed</strong> ({status['failures']} in a row): "
                     f"{e(status['last_error'])}; next try in {status['retry_in_s']} s.")
    return "<h2>distillation</h2><p>" + "<br>".join(lines) + "</p>"

"""Device hosts: the processes (or Ray tasks) the simulated devices live in. A host runs several
`FlDevice`s as threads (`device.fl_client.run_device_host`: a device spends most of a round sleeping off
its throttle), so a fleet of hundreds fits a few processes; MQTT carries everything between the hosts and
the server."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from edgepatch.device.fl_client import DeviceSpec, run_device_host

from .config import SimConfigError

# Only small things cross Ray's object store (spec JSON in, a host record out): MQTT carries the weights.
LOCAL_RAY_OBJECT_STORE_BYTES = 200 * 2**20


def _chunks(items: list[str], n: int) -> list[list[str]]:
    return [items[i::n] for i in range(n) if items[i::n]]


def _ray_device_host(spec_jsons: list[str]) -> dict[str, Any]:
    """A Ray task: run_device_host, plus where it ran (so a caller can tell the hosts really ran on Ray)."""
    import ray

    rounds = run_device_host(spec_jsons)
    ctx = ray.get_runtime_context()
    return {"pid": os.getpid(), "hostname": socket.gethostname(), "node_id": ctx.get_node_id(),
            "worker_id": ctx.get_worker_id(), "rounds": rounds}


class DeviceHosts:
    """Device hosts as local processes (spawned: no inherited broker sockets) or Ray tasks."""

    def __init__(self, specs: list[DeviceSpec], processes: int, ray_address: str) -> None:
        jsons = [s.to_json() for s in specs]
        n = processes or len(specs)
        self.groups = _chunks(jsons, max(1, min(n, len(specs))))
        self.ray_refs: list[Any] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.hosts: list[dict[str, Any]] = []  # where each host ran: pid, and on Ray its node and worker
        if ray_address:
            ray = require_ray()
            if not ray.is_initialized():
                raise SimConfigError("Ray is not connected: run the fleet inside ray_cluster(address)")
            # num_cpus=0: hosts mostly wait on MQTT and sleep their throttle, and every device must be live
            # at once (a host queued behind a CPU slot would miss every round). max_retries=0: a retried
            # host would rejoin mid-round as a device that already ran; a crash is reported instead.
            remote = ray.remote(num_cpus=0, max_retries=0)(_ray_device_host)
            self.ray_refs = [remote.remote(group) for group in self.groups]
        else:
            ctx = multiprocessing.get_context("spawn")
            self.procs = [ctx.Process(target=run_device_host, args=(group,), daemon=True) for group in self.groups]
            for p in self.procs:
                p.start()

    def join(self, timeout: float = 30.0) -> list[str]:
        """Wait for the hosts to leave; returns problems (a crashed host, one that did not stop)."""
        problems: list[str] = []
        if self.ray_refs:
            import ray

            ready, pending = ray.wait(self.ray_refs, num_returns=len(self.ray_refs), timeout=timeout)
            for ref in ready:
                try:
                    self.hosts.append(ray.get(ref))
                except Exception as exc:
                    problems.append(f"ray device host failed: {exc}")
            for ref in pending:
                ray.cancel(ref, force=True)
                problems.append("a ray device host did not stop in time (cancelled)")
        end = time.time() + timeout
        for p in self.procs:
            p.join(max(0.1, end - time.time()))
            if p.is_alive():
                p.terminate()
                p.join(5)
                problems.append(f"device host pid {p.pid} did not stop in time (terminated)")
            elif p.exitcode:
                problems.append(f"device host pid {p.pid} exited with code {p.exitcode}")
            self.hosts.append({"pid": p.pid, "exitcode": p.exitcode})
        return problems


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SimConfigError("a Ray address was given but Ray is not installed: pip install 'edgepatch[sim]' "
                             "(or pip install ray)") from None
    return ray


@contextlib.contextmanager
def ray_cluster(address: str) -> Iterator[dict[str, Any]]:
    """Connect this process to Ray: `"local"` starts a small local cluster (this machine's CPUs, a 200 MB
    object store), anything else is the address of a running cluster (`ray start --head`). Disconnects
    (and stops a local cluster) on exit, unless Ray was already connected by the caller. Yields the
    driver's pid, node id and the cluster's resources."""
    ray = require_ray()
    owned = not ray.is_initialized()
    if owned:
        try:
            if address == "local":
                ray.init(num_cpus=os.cpu_count() or 1, object_store_memory=LOCAL_RAY_OBJECT_STORE_BYTES,
                         include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise SimConfigError(f"cannot connect to Ray at {address!r}: {exc}") from exc
    try:
        yield {"address": address, "driver_pid": os.getpid(), "driver_node_id": ray.get_runtime_context().get_node_id(),
               "resources": {k: float(v) for k, v in ray.cluster_resources().items()}}
    finally:
        if owned:
            ray.shutdown()

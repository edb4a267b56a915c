"""Connecting to Ray: the cluster of a submitted job, a given address, or a local Ray on loopback.

- inside `ray job submit` (the job supervisor sets RAY_ADDRESS to the head's GCS address and
  RAY_JOB_CONFIG_JSON_ENV_VAR) or with RAY_ADDRESS / `ray_address` set: join that cluster;
- otherwise: start a local Ray bound to loopback, without the dashboard, and shut it down when
  the pool closes.

A RAY_ADDRESS that is a dashboard URL (http://host:8265, what `ray job submit` reads) is not a
cluster address; we join the cluster running on this machine (`address="auto"`) instead.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

# Ray binds the machine's external interface unless told it is a "Windows/OSX" (single-machine)
# cluster, and sends usage statistics unless told not to (seen with Ray 2.60).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by the job supervisor for the entrypoint only


def in_submitted_job() -> bool:
    """True when this process is the entrypoint of a `ray job submit` job."""
    return JOB_ENV in os.environ


def cluster_address(address: str | None = None) -> str | None:
    """The Ray address to join, or None for a local Ray.

    `address` (the campaign's `ray_address`) wins; then a submitted job's cluster; then
    RAY_ADDRESS. A dashboard URL becomes "auto" (the cluster on this machine).
    """
    chosen = address or ("auto" if in_submitted_job() else None) or os.environ.get("RAY_ADDRESS")
    if chosen and chosen.startswith(("http://", "https://")):
        log.warning("%s is a dashboard (job submission) address; joining this machine's Ray "
                    "cluster with address='auto'", chosen)
        return "auto"
    return chosen or None


def use_loopback() -> None:
    """Make a local Ray bind 127.0.0.1 only and skip usage statistics (before `ray.init`)."""
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        # Ray reads this flag when it is first imported; an earlier import missed it.
        constants.ENABLE_RAY_CLUSTER = False


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join or start Ray; True when this call started a local Ray (the caller shuts it down)."""
    target = cluster_address(address)
    if target is None:
        use_loopback()
    import ray

    if ray.is_initialized():
        return False
    if target is not None:
        log.info("joining the Ray cluster at %s", target)
        ray.init(address=target)
        return False
    log.info("starting a local Ray (loopback, %s CPUs)", num_cpus or "all")
    ray.init(num_cpus=num_cpus, include_dashboard=False)
    return True


def shutdown() -> None:
    """Stop the Ray this process started."""
    import ray

    if ray.is_initialized():
        ray.shutdown()

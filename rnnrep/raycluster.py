"""Connecting to Ray: a quiet local instance on loopback, or an existing cluster.

The local default must not expose anything beyond this machine: every Ray process
binds to 127.0.0.1, the dashboard stays off unless asked for, and usage statistics
are not sent.
"""

from __future__ import annotations

import os


def connect(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False) -> None:
    """`ray.init` once per process; `address=None` starts a local Ray on loopback."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging

    import ray

    # rnnrep draws its own progress; Ray Data's bars and per-run INFO lines are noise here
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    # Ray binds to the machine's external address by default; this switch keeps every
    # Ray process on 127.0.0.1 (RAY-NOTES.md), and the token auth file is not needed
    # for a cluster nobody else can reach.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=True,
        logging_level="WARNING",
    )

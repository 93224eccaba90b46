"""The processes a lorapool command started, found again and ended when it stops.

Ray starts its processes (GCS, raylet, agents, workers) as children and grandchildren of the
process that starts the node; some of them (the dashboard agent, the runtime-env agent) may
outlive their parent and are then re-parented. `become_subreaper` makes this process the one
they are re-parented to, so that `descendants()` still finds them, and `end_processes` ends
what is left: SIGTERM first (Ray's processes shut down cleanly on it), SIGKILL after a grace.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Iterable

import psutil

log = logging.getLogger("lorapool.processes")

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Linux: orphaned descendants of this process become its children instead of init's."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def descendants(roots: Iterable[psutil.Process] | None = None) -> list[psutil.Process]:
    """`roots` (default: this process's children) and all their descendants that still live."""
    if roots is None:
        roots = psutil.Process().children()
    found: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            if not root.is_running():  # also false when the pid was reused since
                continue
            found[root.pid] = root
            found.update({p.pid: p for p in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def end_processes(procs: Iterable[psutil.Process], *, wait: float = 5.0,
                  grace: float = 5.0) -> list[psutil.Process]:
    """Let `procs` exit on their own for `wait` s, then SIGTERM, then SIGKILL after `grace` s.

    Returns the processes that had to be signalled (for logging). Zombies are reaped when they
    are this process's children (psutil waits on them)."""
    procs = [p for p in procs if _alive(p)]
    _, alive = psutil.wait_procs(procs, timeout=wait) if procs else ([], [])
    signalled = list(alive)
    for sig_name in ("terminate", "kill"):
        if not alive:
            break
        for p in alive:
            try:
                getattr(p, sig_name)()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        _, alive = psutil.wait_procs(alive, timeout=grace)
    for p in alive:
        log.warning("process %s (%s) survived SIGKILL", p.pid, _name(p))
    if signalled:
        log.info("ended %d leftover process(es): %s", len(signalled),
                 ", ".join(f"{p.pid} {_name(p)}" for p in signalled))
    return signalled


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.ZombieProcess:
        return False


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return "?"

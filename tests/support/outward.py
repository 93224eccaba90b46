"""Outward network attempts of the Python processes a test starts, recorded by an audit hook.

`install(site_dir, out)` writes a sitecustomize.py into `site_dir`: every Python process started
with `site_dir` on PYTHONPATH (Ray passes its environment on to what it starts) appends each name
lookup and connection to a host other than loopback to `out/<pid>.txt`; a Unix socket is no host.
`attempts(out)` reads them back. The same file on PYTHONPATH audits a whole test run.
"""

from __future__ import annotations

from pathlib import Path

_HOOK = r'''
import os, sys

def _lorapool_audit(event, args):
    if event not in ("socket.getaddrinfo", "socket.gethostbyname", "socket.connect"):
        return
    try:
        where = args[1] if event == "socket.connect" else args[0]
        host = str(where[0] if isinstance(where, tuple) else where)
    except Exception:
        return
    if host in ("127.0.0.1", "localhost", "::1") or host.startswith(("/", "\x00")):
        return
    with open(os.path.join(OUT, f"{os.getpid()}.txt"), "a") as f:
        f.write(f"{event} {host} {os.path.basename(sys.argv[0]) or '-'}\n")

sys.addaudithook(_lorapool_audit)
'''


def install(site_dir: Path, out: Path) -> None:
    """Write the auditing sitecustomize.py into `site_dir`, recording into `out`."""
    site_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (site_dir / "sitecustomize.py").write_text(f"OUT = {str(out)!r}\n{_HOOK}")


def attempts(out: Path) -> list[tuple[str, str, str]]:
    """(event, host, program) of every outward attempt recorded into `out` so far."""
    found = []
    for f in sorted(out.glob("*.txt")):
        for line in f.read_text().splitlines():
            event, host, program = line.split(" ", 2)
            found.append((event, host, program))
    return found

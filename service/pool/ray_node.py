"""`ray start` for `lorapool donate`, keeping a loopback node address when the admin names one.

Ray replaces a loopback `--node-ip-address` (and a loopback `--address`) by the machine's
outward IP (ray-project/ray#26293), so a node meant to be reachable only on this machine would
listen on the network instead. Its own switch for that (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`)
also refuses to start a worker node; this entry point turns just the rewrite off, and only
for a loopback node address. Run as `python -m lorapool.service.pool.ray_node start …`.
"""

from __future__ import annotations

import sys

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _node_ip(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--node-ip-address="):
            return arg.split("=", 1)[1]
        if arg == "--node-ip-address" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _node_ip(argv) in LOOPBACK:
        from ray._private import services

        services.resolve_ip_for_localhost = lambda host: host
    from ray.scripts.scripts import main as ray_main

    sys.argv = ["ray", *argv]
    ray_main()


if __name__ == "__main__":
    main()

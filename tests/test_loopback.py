"""A local Ray that moeray starts listens on loopback only (RAY-NOTES.md: Ray reads its loopback
switch when it is imported, so setting the variable later in the process is not enough)."""

from __future__ import annotations

from pathlib import Path


def _listening(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on ``port`` (IPv4 and IPv6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(address)
    return found


def test_local_ray_listens_on_loopback_only(ray_local):
    ray = ray_local
    node = ray._private.worker.global_worker.node
    assert node.node_ip_address == "127.0.0.1"
    host, port = node.gcs_address.rsplit(":", 1)
    assert host == "127.0.0.1"
    addresses = _listening(int(port))
    assert addresses, f"nothing listens on the GCS port {port}"
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, ::ffff:127.0.0.1
    assert addresses <= loopback, f"the GCS listens on {addresses}, not only 127.0.0.1"

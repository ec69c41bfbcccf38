"""Where a Ray cluster is, checked before Ray is asked to join it.

``ray.init(address=...)`` retries an address where nothing listens for many minutes (824 s
measured) and fills the terminal with retry warnings; ``resolve_address`` answers in seconds
with one line that names the address and the cause. Standard library only, no Ray.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import MutableMapping
from pathlib import Path

__all__ = ["CURRENT_CLUSTER_FILE", "ClusterUnreachableError", "resolve_address"]

# Where `ray start` records the address of the cluster it started (Ray's default temp dir).
CURRENT_CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")


class ClusterUnreachableError(ConnectionError, ValueError):
    """No Ray cluster answers at the address (a ValueError too: the CLI's one-line errors)."""


def _split(address: str) -> tuple[str, int]:
    """host, port of ``HOST:PORT`` or ``ray://HOST:PORT``."""
    text = address.removeprefix("ray://")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterUnreachableError(
            f"address {address!r}: expected HOST:PORT (the cluster's GCS address, e.g. "
            "127.0.0.1:6379), ray://HOST:PORT or auto"
        )
    return host.strip("[]"), int(port)


def _resolve_host(host: str, port: int, timeout_s: float) -> list:
    """getaddrinfo with a deadline (it has none of its own)."""
    found: list = []
    error: list[BaseException] = []

    def lookup():
        try:
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            error.append(exc)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise ClusterUnreachableError(f"{host}: no answer from the name service in {timeout_s:g} s")
    if error:
        raise ClusterUnreachableError(f"{host}: unknown host ({error[0]})")
    return found


def _check_listening(address: str, timeout_s: float) -> None:
    host, port = _split(address)
    try:
        infos = _resolve_host(host, port, timeout_s)
    except ClusterUnreachableError as exc:
        raise ClusterUnreachableError(f"address {address}: {exc}") from None
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.settimeout(timeout_s)
                s.connect(sockaddr)
                return
        except OSError as exc:
            last = exc
    cause = "timed out" if isinstance(last, TimeoutError) else (last.strerror or str(last))
    raise ClusterUnreachableError(
        f"address {address}: no Ray cluster answers there ({cause}); is it running, and is that "
        "its GCS port (`ray start --head` prints it)?"
    )


def resolve_address(
    address: str,
    timeout_s: float = 3.0,
    environ: MutableMapping[str, str] = os.environ,
    current_cluster: Path = CURRENT_CLUSTER_FILE,
) -> str:
    """The address to join, checked: ``auto`` is RAY_ADDRESS when it is a GCS address, else the
    cluster ``ray start`` last started on this machine; the host must resolve and accept a TCP
    connection on the port within ``timeout_s``. ClusterUnreachableError (one line, naming the
    address and the cause) otherwise."""
    if address.startswith(("http://", "https://")):
        raise ClusterUnreachableError(
            f"address {address}: that is a dashboard (job server) address; give the cluster's "
            "GCS address HOST:PORT (e.g. 127.0.0.1:6379) or auto"
        )
    if address == "auto":
        env = environ.get("RAY_ADDRESS", "")
        if env and not env.startswith(("http://", "https://")):
            address = env
        else:
            try:
                address = current_cluster.read_text().strip()
            except OSError:
                address = ""
            if not address:
                raise ClusterUnreachableError(
                    "address auto: no running Ray cluster found on this machine (start one with "
                    "`ray start --head`, or give --address HOST:PORT)"
                )
    _check_listening(address, timeout_s)
    return address

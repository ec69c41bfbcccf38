"""``ClientJournal``: a client's windows that not every layer actor has acknowledged yet.

A client (``ServiceHandle``) numbers its windows 1, 2, 3, ... under its own id and keeps each one
here until the coordinator reports it confirmed (acknowledged by every layer actor); after the
coordinator restarts, the client resends the windows after ``low`` (the last one every layer
actor has been sent), and the coordinator drops what a layer actor already has. So a window is
lost only if the journal no longer holds it, which ``after`` refuses to hide. At most
``max_windows`` windows and about ``max_bytes`` bytes are kept (one window may cross the bytes):
a client that reaches the bound waits for confirmations (or fails with a message saying so)
before it sends another window.
"""

from __future__ import annotations

from collections import deque

from moeray.actors.steps import Window

__all__ = ["ClientJournal", "JournalGapError"]


class JournalGapError(RuntimeError):
    """The coordinator needs windows this journal no longer holds (their routing is lost)."""


class ClientJournal:
    """The unconfirmed windows of client ``client``, oldest first; max_windows: the bound."""

    def __init__(self, client: str, max_windows: int = 256, max_bytes: int = 256 * 2**20):
        if not isinstance(max_windows, int) or max_windows < 1:
            raise ValueError(f"max_windows: expected an int >= 1, got {max_windows!r}")
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes: expected an int >= 1, got {max_bytes!r}")
        self.client = client
        self.max_windows = max_windows
        self.max_bytes = max_bytes
        self.bytes = 0  # the kept windows' routing and hints
        self._windows: deque[tuple[int, Window]] = deque()
        self._next = 1  # the next window's sequence number
        self.confirmed = 0  # the last window every layer actor acknowledged

    def __len__(self) -> int:
        return len(self._windows)

    def full(self) -> bool:
        return len(self._windows) >= self.max_windows or self.bytes >= self.max_bytes

    def add(self, window: Window) -> int:
        """Keeps ``window`` and returns its sequence number. The caller checks ``full`` first."""
        assert not self.full(), "journal full: confirm windows before adding"
        seq = self._next
        self._next += 1
        self._windows.append((seq, window))
        self.bytes += _nbytes(window)
        return seq

    def confirm(self, confirmed: int) -> None:
        """Forgets every window up to ``confirmed`` (acknowledged by every layer actor)."""
        self.confirmed = max(self.confirmed, confirmed)
        while self._windows and self._windows[0][0] <= confirmed:
            self.bytes -= _nbytes(self._windows.popleft()[1])

    def after(self, low: int) -> list[tuple[int, Window]]:
        """The windows after ``low``, in order, to resend; JournalGapError when the journal no
        longer holds window ``low + 1`` though it was sent (its routing is lost)."""
        first = self._windows[0][0] if self._windows else self._next
        if low + 1 < first:
            raise JournalGapError(
                f"client {self.client}: the service needs windows {low + 1}..{first - 1} again, "
                "which this client no longer holds (a layer actor lost its state while the "
                "coordinator was down, and no report of it was saved): their routing is lost"
            )
        return [(seq, window) for seq, window in self._windows if seq > low]


def _nbytes(window: Window) -> int:
    return sum(
        a.nbytes for a in (window.expert_ids, window.seq_starts, window.hints) if a is not None
    )

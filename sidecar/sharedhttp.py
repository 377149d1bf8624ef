"""The process's one `httpx.AsyncClient`, made on first use.

httpx costs ~5 MiB of RSS to import (urllib.request, http.client, email, …) and
its client ~0.1 s to make (it loads a CA bundle). A daemon that runs only shell,
claude and wake tasks never needs it: the hub's `/api/schemas` and Ollama's
`/api/version` go through `httpget` instead. So the client is made when the
first Ollama task asks for it (`executors.deferred` builds that executor in a
worker thread, hence the lock), and closed at shutdown only if it was made.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    import httpx

CLOSE_TIMEOUT_S = 5.0


class SharedHTTP:
    """A lazily made `httpx.AsyncClient(timeout=None)`; each request sets its own timeouts."""

    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def created(self) -> bool:
        return self._client is not None

    def client(self) -> httpx.AsyncClient:
        """The client, made now if it is the first call (it imports httpx: call it off the loop)."""
        with self._lock:
            if self._client is None:
                if self._closed:
                    raise RuntimeError("the shared HTTP client is closed")
                import httpx

                self._client = httpx.AsyncClient(timeout=None)
            return self._client

    async def aclose(self) -> None:
        """Close the client if it was made (shielded, bounded); later `client()` calls fail."""
        with self._lock:
            client, self._client, self._closed = self._client, None, True
        if client is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                await client.aclose()

    async def __aenter__(self) -> SharedHTTP:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

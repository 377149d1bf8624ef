"""A small client for the hub's HTTP API (protocol.md, "The hub's HTTP API").

Every call raises `HubError` with a message fit for an operator: the route, the
status, and the hub's own `error` text. The token is sent only as a Bearer and
never appears in a message.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlparse, urlunparse

import attrs
import httpx

# One request, end to end (connect, send, answer).
REQUEST_TIMEOUT_S = 15.0


class HubError(Exception):
    """The hub could not be reached or refused a request."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class AlreadyRegistered(HubError):
    """`POST /api/onboard/register` answered 409."""


class TaskNotFound(HubError):
    """`GET /api/tasks/ID` answered 404."""


@attrs.frozen
class Registration:
    """The hub's answer to a registration (or what a rejoin knows)."""

    agent_id: str
    hub_ws_url: str
    hub_api_url: str
    default_repo: str | None


def api_base(url: str) -> str:
    """`http://HOST:PORT` from what the operator typed (a trailing `/` or path is dropped)."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlparse(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    return urlunparse((parts.scheme, parts.netloc, "", "", "", ""))


def ws_url_of(api_url: str) -> str:
    """The hub's WebSocket URL for its API URL: `http://H:P` → `ws://H:P/ws`."""
    parts = urlparse(api_base(api_url))
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunparse((scheme, parts.netloc, "/ws", "", "", ""))


def _error_text(resp: httpx.Response) -> tuple[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200], None
    if isinstance(body, dict):
        text = str(body.get("error") or body)
        errors = body.get("errors")
        if isinstance(errors, list) and errors:
            text += ": " + "; ".join(
                f"{e.get('field')}: {e.get('detail') or e.get('error')}"
                for e in errors
                if isinstance(e, dict)
            )
        return text[:500], body
    return str(body)[:200], body


class HubAPI:
    """The hub's HTTP API at `base_url`, with `token` as the Bearer where one is needed."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, token: str | None = None) -> None:
        self.http = http
        self.base = api_base(base_url)
        self.token = token

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def _call(
        self, method: str, path: str, *, json: Any = None, auth: bool = False, ok: tuple[int, ...] = (200,)
    ) -> httpx.Response:
        url = self.base + path
        try:
            resp = await self.http.request(
                method, url, json=json, headers=self._headers() if auth else {}, timeout=REQUEST_TIMEOUT_S
            )
        except httpx.HTTPError as exc:
            raise HubError(
                f"{method} {path}: hub unreachable at {self.base} ({type(exc).__name__}: {exc})"
            ) from None
        if resp.status_code in ok:
            return resp
        text, body = _error_text(resp)
        if resp.status_code == 401:
            text = f"{text} (the hub refused the token)"
        raise HubError(f"{method} {path}: HTTP {resp.status_code}: {text}", resp.status_code, body)

    @staticmethod
    def _json_object(resp: httpx.Response, what: str) -> dict[str, Any]:
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise HubError(f"{what}: the hub's answer is not a JSON object: {resp.text[:200]!r}")
        return body

    async def health(self) -> dict[str, Any]:
        return self._json_object(await self._call("GET", "/health"), "GET /health")

    async def agents(self) -> list[str]:
        """The agent ids connected now."""
        body = self._json_object(await self._call("GET", "/api/agents"), "GET /api/agents")
        agents = body.get("agents")
        if not isinstance(agents, list):
            return []
        return [str(a.get("agent_id")) for a in agents if isinstance(a, dict) and a.get("agent_id")]

    async def register(self, agent_id: str) -> tuple[Registration, str]:
        """Register `agent_id`: its registration and its new token. 409 raises AlreadyRegistered."""
        try:
            resp = await self._call(
                "POST", "/api/onboard/register", json={"agent_id": agent_id}, ok=(200, 201)
            )
        except HubError as exc:
            if exc.status == 409:
                raise AlreadyRegistered(str(exc), 409, exc.body) from None
            raise
        body = self._json_object(resp, "POST /api/onboard/register")
        token = body.get("token")
        ws, api = body.get("hub_ws_url"), body.get("hub_api_url")
        if not isinstance(token, str) or not token:
            raise HubError("POST /api/onboard/register: the answer holds no token")
        repo = body.get("default_repo")
        reg = Registration(
            agent_id=str(body.get("agent_id") or agent_id),
            hub_ws_url=ws if isinstance(ws, str) and ws else ws_url_of(self.base),
            hub_api_url=api if isinstance(api, str) and api else self.base,
            default_repo=repo if isinstance(repo, str) and repo else None,
        )
        return reg, token

    async def default_repo(self) -> str | None:
        body = self._json_object(await self._call("GET", "/api/config/default-repo"), "default-repo")
        repo = body.get("default_repo")
        return repo if isinstance(repo, str) and repo and body.get("configured", True) else None

    async def check_token(self) -> None:
        """Raise HubError if the hub refuses the token (a task that is not there must be a 404)."""
        try:
            await self._call("GET", "/api/tasks/sidecar-join-token-check", auth=True)
        except TaskNotFound:
            return
        except HubError as exc:
            if exc.status == 404:
                return
            raise

    async def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """`POST /api/tasks`; the hub's answer (`task_id`, `status`, …)."""
        resp = await self._call("POST", "/api/tasks", json=body, auth=True, ok=(200, 201))
        answer = self._json_object(resp, "POST /api/tasks")
        if not isinstance(answer.get("task_id"), str):
            raise HubError(f"POST /api/tasks: the answer holds no task_id: {answer}")
        return answer

    async def task(self, task_id: str) -> dict[str, Any]:
        path = "/api/tasks/" + quote(task_id, safe="")
        try:
            resp = await self._call("GET", path, auth=True)
        except HubError as exc:
            if exc.status == 404:
                raise TaskNotFound(str(exc), 404, exc.body) from None
            raise
        return self._json_object(resp, f"GET {path}")

    async def revoke(self, agent_id: str) -> bool:
        """`DELETE /admin/tokens/NAME`: True if revoked, False if the hub knew no such token."""
        path = "/admin/tokens/" + quote(agent_id, safe="")
        try:
            await self._call("DELETE", path, auth=True, ok=(200, 204))
        except HubError as exc:
            if exc.status == 404:
                return False
            raise
        return True

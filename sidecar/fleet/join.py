"""`sidecar join`: turn this machine into an agent of the fleet, step by step.

    [1/6] preflight    the hub's /health; git (required); claude and Ollama (reported, with the fix)
    [2/6] register     POST /api/onboard/register (409: how to rejoin), or --rejoin --token T
    [3/6] repository   clone the hub's default repository into DIR/repo (argv git, time-limited)
    [4/6] config       DIR/sidecar.toml (no token) and DIR/sidecar.env (the token, mode 0600)
    [5/6] service      --service: install, enable and start sidecar-NAME.service; else print `sidecar run`
    [6/6] smoke test   an `echo` task through the hub's API, followed to its end (--no-smoke: skipped)

Each step that is done is written to DIR/.join-progress.json, so a rerun (same
command) resumes where the last one stopped. Exit status: 0 joined, 1 a step
failed (rerun to resume), 2 bad usage.
"""

from __future__ import annotations

import re
import secrets
import shlex
import shutil
import socket
from pathlib import Path
from typing import Any, TextIO

import attrs
import httpx
import trio

from ..config import ConfigError, load_config
from . import agentdir, repo, service, smoke
from .agentdir import AgentDir, DirError
from .hubapi import AlreadyRegistered, HubAPI, HubError, Registration, api_base, ws_url_of

STEPS = ("preflight", "register", "repository", "config", "service", "smoke test")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
NAME_TRIES = 5


class StepFailed(Exception):
    """A step failed; the message says why and how to fix it."""


@attrs.frozen
class JoinRequest:
    hub: str
    name: str | None = None
    rejoin: bool = False
    token: str | None = None
    dir: str | None = None
    service: bool = False
    smoke: bool = True
    unit_dir: str | None = None
    clone_timeout_s: float = 600.0
    smoke_timeout_s: float = 120.0
    ollama_url: str = "http://127.0.0.1:11434"


def generated_name() -> str:
    """`<hostname>-<4 hex>`, within the hub's name rules."""
    host = re.sub(r"[^A-Za-z0-9._-]+", "-", socket.gethostname()).strip(".-")[:40].lower() or "agent"
    return f"{host}-{secrets.token_hex(2)}"


class Join:
    def __init__(self, req: JoinRequest, out: TextIO, http: httpx.AsyncClient) -> None:
        self.req = req
        self.out = out
        self.api = HubAPI(http, req.hub)
        self.http = http
        self.dir: AgentDir | None = None
        self.progress: dict[str, Any] = {}
        self.ollama_ok = False

    def say(self, step: int, text: str) -> None:
        print(f"[{step}/{len(STEPS)}] {STEPS[step - 1]}: {text}", file=self.out, flush=True)

    def note(self, text: str) -> None:
        print(f"      {text}", file=self.out, flush=True)

    def _save(self, **done: Any) -> None:
        assert self.dir is not None
        self.progress.update(done)
        self.dir.save_progress(self.progress)

    # -- the steps -------------------------------------------------------------

    async def run(self) -> int:
        problem = self._usage_problem()
        if problem:
            print(f"sidecar join: {problem}", file=self.out)
            return EXIT_USAGE
        step = 1
        try:
            await self.preflight()
            step = 2
            token = await self.register()
            step = 3
            await self.repository(token)
            step = 4
            self.write_config(token)
            step = 5
            installed = await self.install_service(token)
            step = 6
            await self.smoke_test(token, installed)
        except (StepFailed, smoke.SmokeFailed, HubError, DirError, ConfigError, OSError) as exc:
            self.say(step, f"FAILED: {exc}")
            if step > 1 and self.dir is not None:
                self.note(f"rerun the same command to resume (progress is kept in {self.dir.path})")
            return EXIT_FAILED
        self._save(complete=True)
        assert self.dir is not None
        print(f"agent {self.progress['agent_id']} has joined the fleet ({self.dir.path})", file=self.out)
        return EXIT_OK

    def _usage_problem(self) -> str | None:
        req = self.req
        try:
            api_base(req.hub)
        except ValueError as exc:
            return f"--hub: {exc}"
        if req.name is not None and (why := agentdir.check_name(req.name)):
            return f"--name: {why}"
        if req.rejoin and (not req.token or not req.name):
            return "--rejoin needs --name NAME and --token T (the agent's existing token)"
        if req.token and not req.rejoin:
            return "--token is for --rejoin (a new agent gets its token from the hub)"
        return None

    async def preflight(self) -> None:
        try:
            health = await self.api.health()
        except HubError as exc:
            raise StepFailed(
                f"{exc}; fix: check --hub (the hub's HTTP address, e.g. http://HOST:4000)"
            ) from None
        if health.get("status") != "ok":
            raise StepFailed(f"the hub's /health says {health}")
        self.say(1, f"hub ok ({health.get('service')}, {health.get('agents_connected')} agents connected)")
        if shutil.which("git") is None:
            raise StepFailed("git not found on PATH; fix: install git (e.g. apt-get install git)")
        self.note("git ok")
        if shutil.which("claude"):
            self.note("claude ok")
        else:
            self.note(
                "claude not found: Claude tasks will fail; fix: npm install -g @anthropic-ai/claude-code"
            )
        url = self.req.ollama_url.rstrip("/")
        try:
            resp = await self.http.get(f"{url}/api/version", timeout=3.0)
            self.ollama_ok = resp.status_code == 200
        except httpx.HTTPError:
            self.ollama_ok = False
        if self.ollama_ok:
            self.note(f"ollama ok at {url}")
        else:
            self.note(
                f"ollama not reachable at {url}: Ollama tasks will fail; fix: install it "
                "(https://ollama.com) or pass --ollama-url"
            )

    def _open_dir(self, name: str | None) -> None:
        """Find the directory (given, per name, or an unfinished join of this hub) and its progress."""
        req = self.req
        if req.dir is not None:
            path: Path | None = Path(req.dir).expanduser().absolute()
        elif name is not None:
            path = agentdir.default_base() / name
        else:
            path = _unfinished_join(api_base(req.hub))
        if path is None:
            return
        self.dir = AgentDir(path)
        self.progress = self.dir.load_progress() if path.is_dir() else {}
        held = self.progress.get("agent_id")
        if held and name and held != name:
            raise DirError(f"{path} holds the join of agent {held!r}: use --name {held} or another --dir")

    async def register(self) -> str:
        req = self.req
        self._open_dir(req.name)
        if self.progress.get("registered"):
            assert self.dir is not None
            token = self.dir.read_token()
            if not token:
                raise StepFailed(
                    f"{self.dir.env_file} holds no token; rejoin with --rejoin --name "
                    f"{self.progress['agent_id']} --token T"
                )
            self.say(2, f"done earlier: agent {self.progress['agent_id']}")
            return token
        if req.rejoin:
            assert req.name is not None and req.token is not None
            self._claim(req.name)
            self.api.token = req.token
            await self.api.check_token()
            reg = Registration(req.name, ws_url_of(req.hub), api_base(req.hub), await self.api.default_repo())
            token = req.token
            self.say(2, f"rejoined as {req.name} with its existing token")
        else:
            reg, token = await self._register_new()
            self.say(2, f"registered as {reg.agent_id}")
        assert self.dir is not None
        self.dir.write_token(token)
        self._save(
            hub=api_base(req.hub),
            agent_id=reg.agent_id,
            hub_ws_url=reg.hub_ws_url,
            hub_api_url=reg.hub_api_url,
            default_repo=reg.default_repo,
            registered=True,
        )
        return token

    def _claim(self, name: str) -> None:
        if self.dir is None:
            self.dir = AgentDir(agentdir.default_base() / name)
        self.dir.claim(name)

    async def _register_new(self) -> tuple[Registration, str]:
        req = self.req
        if req.name is not None:
            self._claim(req.name)
            try:
                return await self.api.register(req.name)
            except AlreadyRegistered:
                raise StepFailed(
                    f"agent {req.name!r} is already registered on the hub. To rejoin with its existing "
                    f"token: sidecar join --hub {req.hub} --name {req.name} --rejoin --token T"
                    + (f" --dir {req.dir}" if req.dir else "")
                ) from None
        taken = set(await self.api.agents())
        for _ in range(NAME_TRIES):
            name = generated_name()
            if name in taken or (self.req.dir is None and (agentdir.default_base() / name).exists()):
                continue
            self._claim(name)
            try:
                return await self.api.register(name)
            except AlreadyRegistered:
                self.note(f"{name} is taken on the hub; trying another name")
                assert self.dir is not None
                self.dir.release()
                if self.req.dir is None:
                    self.dir = None
        raise StepFailed(f"no free name after {NAME_TRIES} tries; pass --name NAME")

    async def repository(self, token: str) -> None:
        assert self.dir is not None
        url = self.progress.get("default_repo")
        if not url:
            self.say(3, "the hub has no default repository: skipped")
            return
        if self.progress.get("repository") == "cloned" and (self.dir.repo / ".git").exists():
            self.say(3, f"done earlier: {url} in {self.dir.repo}")
            return
        if self.dir.repo.exists() or self.dir.repo.is_symlink():
            self.note(f"removing the unfinished clone in {self.dir.repo}")
            await trio.to_thread.run_sync(repo.remove_tree, self.dir.repo)
        error = await repo.clone(url, self.dir.repo, self.req.clone_timeout_s, secret=token)
        if error is not None:
            raise StepFailed(f"git clone {url}: {error}")
        self._save(repository="cloned")
        self.say(3, f"cloned {url} into {self.dir.repo}")

    def write_config(self, token: str) -> None:
        assert self.dir is not None
        p = self.progress
        settings = {
            "agent_id": p["agent_id"],
            "name": p["agent_id"],
            "hub_url": p["hub_ws_url"],
            "hub_api_url": p["hub_api_url"],
            "state_dir": "state",
        }
        if p.get("repository") == "cloned":
            settings["repo_dir"] = "repo"
        if self.ollama_ok or p.get("ollama_url"):
            settings["ollama_url"] = p.get("ollama_url") or self.req.ollama_url
        self.dir.write_config(settings)
        try:
            load_config(self.dir.config_file, env={"SIDECAR_TOKEN": token})
        except ConfigError as exc:
            raise StepFailed(f"the written config does not load: {exc}") from None
        self._save(config=True, ollama_url=settings.get("ollama_url"))
        self.say(4, f"wrote {self.dir.config_file} (token in {self.dir.env_file}, mode 0600)")

    def run_command(self) -> str:
        assert self.dir is not None
        argv = service.sidecar_argv(self.dir.config_file)
        argv[argv.index("--log-format") : argv.index("run")] = []
        return f"env $(cat {shlex.quote(str(self.dir.env_file))}) " + shlex.join(argv)

    async def install_service(self, token: str) -> bool:
        """True if the service runs the agent now."""
        assert self.dir is not None
        if not self.req.service:
            self.say(5, "not installed (no --service); run the agent with:")
            self.note(self.run_command())
            return False
        if not service.systemd_present():
            self.say(5, "systemd not found (no systemctl on PATH): not installed; run the agent with:")
            self.note(self.run_command())
            return False
        agent = str(self.progress["agent_id"])
        unit = service.unit_for(agent, Path(self.req.unit_dir) if self.req.unit_dir else None)
        if self.progress.get("service") == str(unit.path) and unit.path.exists():
            self.say(5, f"done earlier: {unit.name}")
            return True
        if not service.TEMPLATE.is_file():
            raise StepFailed(f"no unit template at {service.TEMPLATE} (deploy/ comes with the source)")
        template = await trio.Path(service.TEMPLATE).read_text("utf-8")
        text = service.render(
            template, unit, agent, self.dir.path, service.sidecar_argv(self.dir.config_file)
        )
        unit.path.parent.mkdir(parents=True, exist_ok=True)
        await trio.Path(unit.path).write_text(text, "utf-8")
        for args in (("daemon-reload",), ("enable", "--now", unit.name)):
            ok, said = await service.run_systemctl(unit.systemctl(*args), secret=token)
            if not ok:
                raise StepFailed(f"systemctl {' '.join(args)}: {said}")
        self._save(service=str(unit.path))
        self.say(5, f"installed {unit.path}, enabled and started {unit.name}")
        return True

    async def smoke_test(self, token: str, installed: bool) -> None:
        assert self.dir is not None
        if not self.req.smoke:
            self.say(6, "skipped (--no-smoke)")
            return
        if self.progress.get("smoke") == "passed":
            self.say(6, "passed earlier")
            return
        api = HubAPI(self.http, str(self.progress["hub_api_url"]), token)
        agent = str(self.progress["agent_id"])
        runner = "the installed service" if installed else "a sidecar of join's own (for the test only)"
        self.note(f"submitting an echo task for {agent}; {runner} runs it")
        config = None if installed else load_config(self.dir.config_file, env={"SIDECAR_TOKEN": token})
        task = await smoke.run_smoke(api, agent, config, self.req.smoke_timeout_s)
        self._save(smoke="passed")
        self.say(6, f"passed: {task}")


def _unfinished_join(hub: str) -> Path | None:
    """The one directory under the default base holding an unfinished join of `hub`."""
    base = agentdir.default_base()
    if not base.is_dir():
        return None
    found = []
    for child in sorted(base.iterdir()):
        d = AgentDir(child)
        if d.marker_agent() is None:
            continue
        try:
            progress = d.load_progress()
        except DirError:
            continue
        if progress.get("hub") == hub and progress.get("registered") and not progress.get("complete"):
            found.append(child)
    return found[0] if len(found) == 1 else None


async def run_join(req: JoinRequest, out: TextIO) -> int:
    async with httpx.AsyncClient() as http:
        return await Join(req, out, http).run()

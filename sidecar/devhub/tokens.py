"""The dev hub's agent tokens: configured ones, registered ones, revoked ones.

As the real hub's token registry: `POST /api/onboard/register` gives an agent a
new token, `DELETE /admin/tokens/NAME` revokes it, and any valid agent token is
also a Bearer for the HTTP API. Registrations live in `HubState`, so a
restarted hub keeps them, as the real one (on disk) does.
"""

from __future__ import annotations

import secrets

from ..log import get_logger, register_secret
from .config import HubConfig
from .state import HubState

log = get_logger(__name__)


class HubTokens:
    def __init__(self, config: HubConfig, state: HubState) -> None:
        self.config = config
        self.state = state

    def auth_error(self, agent_id: str, token: str) -> str | None:
        """None if `token` lets `agent_id` in, else the hub's error word."""
        owners = self.owners(token)
        if owners is None:
            return None
        if not owners:
            return "invalid_token"
        return None if agent_id in owners else "token_agent_mismatch"

    def owners(self, token: str) -> set[str] | None:
        """The agents `token` belongs to (empty: none); None if it is the shared token."""
        state = self.state
        owners = {a for a, tok in state.registered.items() if tok == token and a not in state.revoked}
        tokens = self.config.tokens
        if isinstance(tokens, str):
            return None if token == tokens and not owners else owners
        owners |= {a for a, tok in tokens.items() if tok == token and a not in state.revoked}
        return owners

    def is_registered(self, agent_id: str) -> bool:
        """The agent has a token on this hub (configured or registered, not revoked)."""
        if agent_id in self.state.revoked:
            return False
        tokens = self.config.tokens
        return agent_id in self.state.registered or (not isinstance(tokens, str) and agent_id in tokens)

    def register(self, agent_id: str) -> str | None:
        """Give `agent_id` a new token; None if it already has one."""
        if self.is_registered(agent_id):
            return None
        token = secrets.token_hex(24)
        self.state.revoked.discard(agent_id)
        self.state.registered[agent_id] = token
        register_secret(token)
        log.info("devhub_agent_registered", agent_id=agent_id)
        return token

    def revoke(self, agent_id: str) -> bool:
        """Revoke the agent's token; False if it has none."""
        if not self.is_registered(agent_id):
            return False
        self.state.registered.pop(agent_id, None)
        self.state.revoked.add(agent_id)
        log.info("devhub_token_revoked", agent_id=agent_id)
        return True

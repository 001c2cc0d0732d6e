"""Who may use the page: one-time login tokens, sessions and their CSRF tokens, the Host and Origin rules, and rate
buckets. Pure logic on a clock the caller passes in; node/gui/web.py applies it to every request."""

import hashlib
import hmac
import secrets
from collections import Counter

import attrs

TOKEN_BYTES = 32
LOGIN_TOKEN_TTL_S = 120.0
LOGIN_TOKENS_MAX = 8
SESSION_IDLE_S = 12 * 3600.0
SESSIONS_MAX = 16
COOKIE_PREFIX = "aico_session_"
# Sec-Fetch-Site values a browser sends on a request the page itself made (absent from older browsers and curl).
_SAME_ORIGIN_FETCH = (None, "same-origin")
# ... and on one the user made (typing the address, a bookmark, the link `aico-node gui` printed).
_OWN_FETCH = (*_SAME_ORIGIN_FETCH, "none")


def _digest(secret: str) -> bytes:
    # Tables are keyed by a hash of each secret, so a lookup's timing says nothing about the secrets held.
    return hashlib.sha256(secret.encode()).digest()


@attrs.define
class Session:
    """One logged-in browser: the CSRF token its state-changing requests carry, and when it was last used."""

    csrf: str
    last_used_s: float


class Gatekeeper:
    """Issues login tokens, exchanges them for sessions, and tells which requests may reach the page.

    `host` is the address the page is bound to, as a Host header names it ("127.0.0.1:8395", "[::1]:8395").
    """

    def __init__(self, host: str) -> None:
        self.host = host
        self.origin = f"http://{host}"
        # Browsers send one cookie jar to every port of a host: the port in the name keeps two nodes' sessions apart.
        self.cookie_name = COOKIE_PREFIX + host.rsplit(":", 1)[1]
        self._login_tokens: dict[bytes, float] = {}  # token digest -> expiry
        self._sessions: dict[bytes, Session] = {}  # session id digest -> session
        self.refused: Counter[str] = Counter()  # requests refused, by the rule that refused them

    def issue_login_token(self, now_s: float) -> str:
        """Return a new one-time login token, valid for LOGIN_TOKEN_TTL_S; the oldest is dropped beyond the bound."""
        self._login_tokens = {d: t for d, t in self._login_tokens.items() if t > now_s}
        while len(self._login_tokens) >= LOGIN_TOKENS_MAX:
            del self._login_tokens[min(self._login_tokens, key=self._login_tokens.__getitem__)]
        token = secrets.token_urlsafe(TOKEN_BYTES)
        self._login_tokens[_digest(token)] = now_s + LOGIN_TOKEN_TTL_S
        return token

    def log_in(self, token: str, now_s: float) -> str | None:
        """Spend a login token and return a new session id, or None if the token is unknown, used or expired."""
        expires_s = self._login_tokens.pop(_digest(token), None)
        if expires_s is None or expires_s <= now_s:
            return None
        self._sessions = {d: s for d, s in self._sessions.items() if s.last_used_s + SESSION_IDLE_S > now_s}
        while len(self._sessions) >= SESSIONS_MAX:
            del self._sessions[min(self._sessions, key=lambda d: self._sessions[d].last_used_s)]
        session_id = secrets.token_urlsafe(TOKEN_BYTES)
        self._sessions[_digest(session_id)] = Session(csrf=secrets.token_urlsafe(TOKEN_BYTES), last_used_s=now_s)
        return session_id

    def session(self, session_id: str | None, now_s: float) -> Session | None:
        """Return the live session with this id (and mark it used), or None."""
        if not session_id:
            return None
        session = self._sessions.get(_digest(session_id))
        if session is None or session.last_used_s + SESSION_IDLE_S <= now_s:
            return None
        session.last_used_s = now_s
        return session

    def log_out(self, session_id: str) -> None:
        self._sessions.pop(_digest(session_id), None)

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def host_allowed(self, host_header: str | None) -> bool:
        """Whether the Host header names the bound address: a page reached under another name (DNS rebinding) is not
        served."""
        return host_header == self.host

    @staticmethod
    def fetch_allowed(method: str, fetch_site: str | None, fetch_mode: str | None) -> bool:
        """Whether a browser may make this request from where it stands: another site (another local port is the
        same site) may only navigate to the page, never fetch from it (a resource isolation policy)."""
        return fetch_site in _OWN_FETCH or (method == "GET" and fetch_mode == "navigate")

    def same_origin(self, origin: str | None, fetch_site: str | None) -> bool:
        """Whether a state-changing request comes from the page itself (its Origin, and no cross-site fetch)."""
        return origin == self.origin and fetch_site in _SAME_ORIGIN_FETCH

    @staticmethod
    def csrf_ok(session: Session, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(session.csrf.encode(), token.encode())


class RateBucket:
    """A token bucket: `burst` requests at once, refilled at `rate_per_s`."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._updated_s: float | None = None

    def available(self, now_s: float) -> bool:
        """Whether a token is there to take."""
        if self._updated_s is not None:
            self._tokens = min(self.burst, self._tokens + (now_s - self._updated_s) * self.rate_per_s)
        self._updated_s = now_s
        return self._tokens >= 1

    def take(self, now_s: float) -> bool:
        """Take one token if there is one; whether the request may go on."""
        if not self.available(now_s):
            return False
        self._tokens -= 1
        return True

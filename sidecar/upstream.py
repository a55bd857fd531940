"""One configured upstream: its rules, and the one choice of the client that carries each request.

Everything per upstream is built once (authority, injection rule, client
glob, header drop list, both clients); a request only does look-ups. The clients
are in ``sidecar.transport`` (``base``: the Transport interface, limits and the
answer Protocol; ``fast``: the lean client; ``aio``: aiohttp's; ``failures``: the
error table). ``_pick`` chooses between them; every upstream error is counted in
``send``, through ``transport.failures``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

from sidecar import net
from sidecar.config import UpstreamSettings
from sidecar.errors import SidecarError
from sidecar.inject import Injection, build_injection
from sidecar.net import Lookup, trust_context, url_host
from sidecar.policy import compile_client_matcher
from sidecar.transport.aio import AioClient
from sidecar.transport.base import HOP_BY_HOP, LOCAL_CREDENTIAL_HEADERS, Transport, UpstreamAnswer, lean_enabled
from sidecar.transport.failures import count, counters, forbidden_address, translate

if TYPE_CHECKING:
    from sidecar.transport.fast import FastPool


class Upstream:
    """A compiled upstream: send requests with ``send`` after ``start``.

    ``lean``: whether the lean client carries what it can (default: the environment,
    ``transport.base.lean_enabled``). ``lookup``: how both clients resolve names
    (``net.lookup``); whatever answers, the address guard decides where they connect.
    """

    def __init__(self, settings: UpstreamSettings, *, lean: bool | None = None, lookup: Lookup = net.lookup) -> None:
        self.settings = settings
        self.name = settings.name
        default_port = 443 if settings.scheme == "https" else 80
        #: host[:port] as in a Host header and a URL (the port only when not the default)
        self.authority = url_host(settings.host) + ("" if settings.port == default_port else f":{settings.port}")
        self.injection: Injection = build_injection(settings.inject)
        self.client_matcher = compile_client_matcher(settings.clients)
        self.scopes = frozenset(settings.scopes)
        # Expect: this hop meets it (the proxy answers 100 Continue and reads the body),
        # so the upstream must not wait for a body that is already here.
        self.drop_request_headers = HOP_BY_HOP | LOCAL_CREDENTIAL_HEADERS | {"host", "expect"} | self.injection.drop
        self._lean = lean_enabled() if lean is None else lean
        self._lookup = lookup
        #: the forbidden_address refusal both clients raise, naming this upstream's opt-in
        self.forbidden_address = functools.partial(forbidden_address, self.name)
        #: the lean client (None when it is off) and aiohttp's, made by ``start``
        self.fast: FastPool | None = None
        self.aio: AioClient | None = None
        self._errors = counters(self.name)

    async def start(self) -> None:
        """Create both clients (needs a running loop)."""
        s = self.settings
        ssl_context = trust_context(s.ca_file) if s.scheme == "https" else None
        if self._lean:
            from sidecar.transport.fast import FastPool  # needs httptools (lean_enabled checks it is there)

            # One pool per upstream: its connections all go to this upstream's dial
            # address, so two upstreams of one origin (or one with connect_to) never share one.
            self.fast = FastPool(
                s.host, s.port, ssl_context, s.allow_private, s.timeout_seconds, self.authority,
                dial=s.connect_to, refusal=self.forbidden_address, lookup=self._lookup,
            )
        self.aio = AioClient(
            s.host, s.port, ssl_context, s.allow_private, s.timeout_seconds, self.authority,
            dial=s.connect_to, refusal=self.forbidden_address, lookup=self._lookup,
        )
        for transport in self._transports():
            await transport.start()

    def _transports(self) -> list[Transport]:
        return [t for t in (self.fast, self.aio) if t is not None]

    def _pick(self, method: str, data: Any) -> FastPool | None:
        """The lean client when it carries this request, None when aiohttp does: the one choice.

        The lean client carries all but HEAD (llhttp cannot be told an answer has no
        body) and streamed request bodies (it writes a buffered body in one go).
        """
        if method != "HEAD" and (data is None or isinstance(data, bytes)):
            return self.fast
        return None

    async def send(
        self, method: str, target: str, headers: CIMultiDict[str], data: Any, client: str
    ) -> UpstreamAnswer:
        """Send one request for ``client`` (``target`` is the raw path and query); failures become our errors."""
        aio = self.aio
        assert aio is not None and aio.session is not None
        try:
            fast = self._pick(method, data)
            if fast is not None:
                # The lean client bounds the connection wait, connecting and the head together.
                return await fast.send(method, target, headers, data, client)
            return await aio.send(method, target, headers, data, client)
        except SidecarError as err:
            count(self._errors, err)
            raise
        except Exception as exc:
            refusal = translate(exc)
            count(self._errors, refusal)
            raise refusal from None

    def key_wait(self, client: str, delta: int) -> None:
        """A request of ``client`` starts (+1) or stops (-1) waiting for its key: connect meanwhile."""
        if self.fast is not None:
            self.fast.key_wait(client, delta)

    async def close(self) -> None:
        for transport in self._transports():
            await transport.close()

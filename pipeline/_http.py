"""aiobotocore's HTTP session with every wait of an S3 request bounded.

aiobotocore builds ``aiohttp.ClientTimeout(sock_connect, sock_read)`` from botocore's config, which leaves two
waits of a request with no time-out at all:

* ``Expect: 100-continue``, which botocore puts on every PUT with a body: aiohttp sends the headers and waits
  for the server's ``100`` before the body, and starts the read time-out only once the body is sent. A server
  that never answers that request (rclone's S3 server under concurrent PUTs into one prefix) leaves the call
  waiting forever on an idle event loop. Without the header the body goes at once and ``read_timeout``
  covers the wait for the answer, which botocore's retry modes then retry. What the header saves, a body
  sent to a server that refuses it, is small for this pipeline's objects (chunks and shards).
* Sending the body: aiohttp has no write time-out, and a server that stops reading (hung, with its TCP
  connection up) stops a large PUT forever. A request with a body gets a total time-out: the pool wait,
  the read time-out and the body at :data:`pipeline.storage.UPLOAD_MIN_BYTES_PER_S`. Reads are not given
  one, so a long download is never cut off (``read_timeout`` bounds each of its stalls).
* A free slot of the connection pool (aiohttp's ``connect``): a slot never handed back parks every later
  request of the process. It is bounded by :data:`pipeline.storage.POOL_WAIT_S`, then botocore's
  ``ConnectTimeoutError``.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiobotocore.httpsession import AIOHTTPSession

# The bounds are read from the module at each use, so a test can lower them.
from pipeline import storage


class BoundedSession(AIOHTTPSession):
    """The aiohttp session of every S3 client this package builds (``config_kwargs["http_session_cls"]``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        base: aiohttp.ClientTimeout = self._timeout  # type: ignore[has-type]
        connect = storage.POOL_WAIT_S + (base.sock_connect or 0.0)
        self._timeout = aiohttp.ClientTimeout(sock_connect=base.sock_connect, sock_read=base.sock_read, connect=connect)

    def _get_request_timeout(self, request: Any) -> aiohttp.ClientTimeout:
        base = super()._get_request_timeout(request) or self._timeout
        size = int(request.headers.get("Content-Length") or 0)
        total = None
        if size:
            total = (self._timeout.connect or 0.0) + (base.sock_read or 0.0) + size / storage.UPLOAD_MIN_BYTES_PER_S
        return aiohttp.ClientTimeout(
            sock_connect=base.sock_connect, sock_read=base.sock_read, connect=self._timeout.connect, total=total
        )

    async def send(self, request: Any) -> Any:
        request.headers.pop("Expect", None)  # not a signed header: dropping it keeps the signature valid
        return await super().send(request)

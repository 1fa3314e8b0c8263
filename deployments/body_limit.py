"""Refuse request bodies over a size limit before they are buffered (pure ASGI middleware).

A declared Content-Length over the limit is answered 413 without reading a byte; a body that
streams in (chunked, or lying about its length) is cut off at the limit while it arrives. The
replica never holds more than the limit of any request body.
"""
from __future__ import annotations

import json

LIMIT = {"bytes": 50 * 2**20}  # set by the Ingress from its ServeLimits (one process per replica)


class BodyTooLarge(Exception):
    pass


def _refusal(limit: int) -> bytes:
    return json.dumps({"error": "body_too_large",
                       "message": f"the request body is over the limit of {limit} bytes ({limit // 2**20} MiB): "
                                  "send smaller or fewer files"}).encode()


class BodyLimit:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = LIMIT["bytes"]
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(send, limit)
        seen, started, refused = 0, False, False

        async def counted_receive():
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit and not refused:
                    refused = True
                    if not started:  # answered here: the app turns errors while parsing a body into a 400
                        await self._refuse(send, limit)
                    raise BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if refused:  # the 413 went out; the app's own answer to the cut-off body is dropped
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyTooLarge:
            pass

    @staticmethod
    async def _refuse(send, limit: int) -> None:
        from deployments import metrics

        metrics.REQUESTS.labels("refused", "413").inc()
        body = _refusal(limit)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

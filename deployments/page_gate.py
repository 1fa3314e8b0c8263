"""The web page's gate: every request to /ui passes here before Gradio sees it.

A Gradio file value is a server path the browser sends back, and Gradio checks it only in an app
it launched itself (never in one mounted on ours), while its file route serves its whole cache to
anyone. So the gate, not Gradio, decides:

- a browser signs in by presenting its API token once (`POST /ui/session`, sent by the page's
  Sign-in button); it gets an HttpOnly, SameSite=Strict cookie naming a session of one tenant.
  Gradio's own client may present `Authorization: Bearer <token>` on every request instead;
- uploads need a session; each file uploaded, and each file Gradio made for a page answer, belongs
  to the tenant that received it (PageFiles);
- a request whose body names a file (a `path` or `url` of a file value) is refused unless every
  such file belongs to the caller's tenant, before Gradio opens or copies anything;
- the file route serves a tenant's own files only, to that tenant;
- no absolute server path leaves: the page's folder is called `page-files/` in every answer, and
  the gate maps it back on the way in.

The sessions and the ownership table live in this replica (the Ingress runs one replica while it
serves the page: deployments/app.py).
"""
from __future__ import annotations

import json
import re
import secrets
import shutil
import threading
import time
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import unquote, urlsplit

from deployments import auth

COOKIE = "ray_faceid_page"
ALIAS = "page-files"
SESSION_S = 8 * 3600
MAX_BODY = 1 << 20  # an action's JSON (uploads go through /upload, which is streamed to Gradio)
_FILE_ROUTE = re.compile(r"/file[=/](.*)$")


class PageFiles:
    """Which files under the page's folder belong to which tenant."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self._owner: dict[Path, str] = {}
        self._lock = threading.Lock()

    def resolve(self, value: str) -> Path | None:
        """A file value (aliased or absolute) -> its absolute path under the page's folder, or None."""
        value = unquote(value)
        if value.startswith(ALIAS + "/"):
            value = str(self.root) + value[len(ALIAS):]
        try:
            path = Path(value).resolve()
        except (OSError, ValueError):
            return None
        return path if path != self.root and path.is_relative_to(self.root) else None

    def claim(self, tenant: str, path: Path) -> None:
        with self._lock:
            self._owner.setdefault(path, tenant)

    def owned_by(self, tenant: str | None, value: str) -> Path | None:
        """The file a value names, if it belongs to `tenant`."""
        path = self.resolve(value)
        if tenant is None or path is None:
            return None
        with self._lock:
            return path if self._owner.get(path) == tenant else None

    def claim_named(self, tenant: str, text: str) -> None:
        """Claim for `tenant` every page file an answer names (before its paths are aliased)."""
        for found in re.findall(re.escape(str(self.root)) + r"/[^\"'\s\\]+", text):
            path = self.resolve(found)
            if path is not None:
                self.claim(tenant, path)

    def forget_tenant(self, tenant: str) -> int:
        """Delete every page file of `tenant` (on an erasure: uploads, previews and answers may show
        the person, and the page cannot tell whose face a file holds). Returns how many."""
        with self._lock:
            mine = [p for p, t in self._owner.items() if t == tenant]
            for path in mine:
                del self._owner[path]
        for path in mine:
            path.unlink(missing_ok=True)
            folder = path.parent  # Gradio keeps each file in a folder of its own
            if folder != self.root and folder.is_relative_to(self.root) and not any(folder.iterdir()):
                shutil.rmtree(folder, ignore_errors=True)
        return len(mine)

    def public(self, body: bytes) -> bytes:
        return body.replace(str(self.root).encode(), ALIAS.encode())

    def private(self, body: bytes) -> bytes:
        return body.replace(ALIAS.encode() + b"/", str(self.root).encode() + b"/")


def file_values(value) -> list[str]:
    """Every file a request body names: the `path` and `url` of each file value, at any depth."""
    found = []
    if isinstance(value, dict):
        for key in ("path", "url"):
            if isinstance(value.get(key), str):
                found.append(value[key])
        for item in value.values():
            found += file_values(item)
    elif isinstance(value, list):
        for item in value:
            found += file_values(item)
    return found


def _named_file(value: str) -> str:
    """The file a file value's `path` or `url` names: a url only through this page's own file route."""
    if "://" not in value:
        return value
    parts = urlsplit(value)
    routed = _FILE_ROUTE.search(parts.path)
    return routed.group(1) if routed and not parts.query else ""


class PageGate:
    """ASGI middleware in front of the mounted Gradio app (see the module's docstring)."""

    def __init__(self, app, files: PageFiles, tokens: dict[str, str]):
        self.app, self.files, self.tokens = app, files, tokens
        self._sessions: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    # -- who is calling --------------------------------------------------------------------------
    def tenant(self, scope) -> str | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        bearer = auth.tenant_for(headers.get("authorization"), self.tokens)
        if bearer is not None:
            return bearer
        morsel = SimpleCookie(headers.get("cookie", "")).get(COOKIE)
        if morsel is None:
            return None
        with self._lock:
            tenant, expires = self._sessions.get(morsel.value, (None, 0.0))
        return tenant if expires > time.time() else None

    def _new_session(self, tenant: str) -> str:
        sid = secrets.token_urlsafe(32)
        now = time.time()
        with self._lock:
            self._sessions = {k: v for k, v in self._sessions.items() if v[1] > now}
            self._sessions[sid] = (tenant, now + SESSION_S)
        return sid

    # -- ASGI ----------------------------------------------------------------------------------
    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        root = scope.get("root_path", "")
        local = path[len(root):] if root and path.startswith(root) else path
        tenant = self.tenant(scope)
        method = scope["method"]
        if local.rstrip("/") == "/session" and method == "POST":
            return await self._sign_in(scope, receive, send)
        routed = _FILE_ROUTE.search(local)
        if routed:
            owned = self.files.owned_by(tenant, routed.group(1))
            if owned is None:
                return await _answer(send, 404, "no such file for this token")
            scope = {k: v for k, v in scope.items() if k != "raw_path"}  # routing reads `path`
            scope["path"] = path[:len(path) - len(routed.group(1))] + str(owned)
            return await self.app(scope, receive, send)
        if local.endswith("/upload") or local.endswith("/upload/"):
            if tenant is None:
                return await _answer(send, 401, "sign in with your API token before uploading")
            return await self.app(scope, receive, self._claiming(send, tenant))
        if method in ("POST", "PUT", "PATCH"):
            body = await _read_body(receive)
            if body is None:
                return await _answer(send, 413, f"the request is over {MAX_BODY} bytes")
            body = self.files.private(body)
            try:
                data = json.loads(body) if body.strip() else None
            except ValueError:
                return await _answer(send, 400, "the page sends JSON here")
            for value in file_values(data):
                if self.files.owned_by(tenant, _named_file(value)) is None:
                    return await _answer(send, 403, "a file in this request was not uploaded with your token: "
                                                    "upload it again from this page")
            scope = dict(scope, headers=[(k, str(len(body)).encode() if k.lower() == b"content-length" else v)
                                         for k, v in scope["headers"]])
            return await self.app(scope, _replay(body, receive), self._claiming(send, tenant))
        return await self.app(scope, receive, self._claiming(send, tenant))

    async def _sign_in(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        body = await _read_body(receive) or b"{}"
        try:
            token = str(json.loads(body).get("token") or "")
        except (ValueError, AttributeError):
            token = ""
        tenant = auth.tenant_for(headers.get("authorization") or f"Bearer {token.strip()}", self.tokens)
        if tenant is None:  # a wrong token also ends the browser's earlier session
            return await _answer(send, 401, "the API token is missing or not valid",
                                 cookie=f"{COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict")
        cookie = f"{COOKIE}={self._new_session(tenant)}; Max-Age={SESSION_S}; Path=/; HttpOnly; SameSite=Strict"
        return await _answer(send, 200, "signed in", cookie=cookie)

    def _claiming(self, send, tenant: str | None):
        """`send`, with every page file the answer names claimed for `tenant`, then aliased."""
        files = self.files

        async def wrapped(message):
            if message["type"] == "http.response.start":
                # Bodies change length once aliased: let the server frame them.
                message = dict(message, headers=[(k, v) for k, v in message.get("headers", [])
                                                 if k.lower() != b"content-length"])
            elif message["type"] == "http.response.body" and message.get("body"):
                body = message["body"]
                if tenant is not None:
                    files.claim_named(tenant, body.decode("utf-8", "replace"))
                message = dict(message, body=files.public(body))
            await send(message)

        return wrapped


async def _read_body(receive) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """The (rewritten) body once, then the client's own messages (a disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


async def _answer(send, status: int, message: str, cookie: str | None = None) -> None:
    body = json.dumps({"error": {401: "unauthorized", 403: "forbidden", 404: "not_found", 413: "too_large"}.get(
        status, "ok" if status < 400 else "bad_request"), "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if cookie:
        headers.append((b"set-cookie", cookie.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

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
  such file belongs to the caller's tenant, before Gradio opens or copies anything; a file value is
  taken literally (no decoding, no `..`, no symlink) and rewritten to the very path checked;
- the file route serves a tenant's own files only, to that tenant;
- no absolute server path leaves: the page's folder is called `page-files/` in every answer, and
  the gate maps it back on the way in.

The sessions and the ownership table live in this replica (the Ingress runs one replica while it
serves the page: deployments/app.py).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import threading
import time
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlsplit

from deployments import auth

COOKIE = "ray_faceid_page"
ALIAS = "page-files"
SESSION_S = 8 * 3600
MAX_BODY = 1 << 20  # an action's JSON (uploads go through /upload, which is streamed to Gradio)
_FILE_ROUTE = re.compile(r"/file[=/](.*)$")


class PageFiles:
    """Which files under the page's folder belong to which tenants (Gradio names a file by its
    content's hash, so two tenants uploading the same bytes share one path: each owns it)."""

    def __init__(self, root: str | Path):
        self.root = Path(os.path.realpath(root))
        self._owners: dict[Path, set[str]] = {}
        self._lock = threading.Lock()

    def resolve(self, value: str) -> Path | None:
        """A file value (aliased or absolute) -> the file under the page's folder it names, or None.
        Taken literally, as Gradio takes it: no decoding, no `..`, no symlink, no URL, so the file
        checked is the file Gradio opens."""
        if not isinstance(value, str) or "%" in value or "\\" in value or "://" in value or "\0" in value:
            return None
        if value.startswith(ALIAS + "/"):
            value = str(self.root) + value[len(ALIAS):]
        if ".." in value.split("/"):
            return None
        literal = os.path.abspath(value)
        if literal != os.path.realpath(literal):  # a symlink anywhere on the way
            return None
        path = Path(literal)
        return path if path != self.root and path.is_relative_to(self.root) else None

    def claim(self, tenant: str, path: Path) -> None:
        with self._lock:
            self._owners.setdefault(path, set()).add(tenant)

    def owned_by(self, tenant: str | None, value: str) -> Path | None:
        """The file a value names, if `tenant` owns it."""
        path = self.resolve(value)
        if tenant is None or path is None:
            return None
        with self._lock:
            return path if tenant in self._owners.get(path, ()) else None

    def claim_named(self, tenant: str, text: str) -> None:
        """Claim for `tenant` every page file an answer names (before its paths are aliased). Only
        Gradio writes the page folder's real path into answers: requests name files by the alias."""
        for found in re.findall(re.escape(str(self.root)) + r"/[^\"'\s\\]+", text):
            path = self.resolve(found)
            if path is not None:
                self.claim(tenant, path)
        self._prune()

    def _prune(self) -> None:
        """Forget files Gradio's time-to-live already deleted."""
        with self._lock:
            if len(self._owners) > 1000:
                self._owners = {p: t for p, t in self._owners.items() if p.exists()}

    def forget_tenant(self, tenant: str) -> int:
        """Delete every page file of `tenant` (on an erasure: uploads, previews and answers may show
        the person, and the page cannot tell whose face a file holds); a file another tenant also
        owns (the same bytes) stays theirs. Returns how many were deleted."""
        with self._lock:
            mine = [p for p, owners in self._owners.items() if tenant in owners]
            gone = []
            for path in mine:
                self._owners[path].discard(tenant)
                if not self._owners[path]:
                    del self._owners[path]
                    gone.append(path)
        for path in gone:
            path.unlink(missing_ok=True)
            folder = path.parent  # Gradio keeps each file in a folder of its own
            if folder != self.root and folder.is_relative_to(self.root) and not any(folder.iterdir()):
                shutil.rmtree(folder, ignore_errors=True)
        return len(gone)

    def mentions(self, text: str) -> bool:
        """Whether a text names the page folder by its real path (only Gradio's answers do)."""
        return str(self.root) in text

    def public(self, body: bytes) -> bytes:
        return body.replace(str(self.root).encode(), ALIAS.encode())


class ForeignFile(ValueError):
    """A file value that does not name a file of the caller's tenant."""


def own_files(value, owned, mentions=lambda text: False):
    """`value` (a request's JSON) with each file value's `path` replaced by the file `owned(text)`
    checked (its `url` dropped: Gradio then opens exactly that file); ForeignFile for any other, and
    for any other text that `mentions` the page folder: Gradio may echo a text into its answer (a
    value not among a dropdown's choices), and every page file an answer names is claimed for the
    caller, so a text naming another tenant's file would make it theirs."""
    if isinstance(value, str):
        if mentions(value) and owned(value) is None:
            raise ForeignFile(value)
        return value
    if isinstance(value, dict):
        if any(mentions(key) for key in value if isinstance(key, str)):  # a name only Gradio's answers hold
            raise ForeignFile("a key naming the page folder")
        out = {k: own_files(v, owned, mentions) for k, v in value.items()}
        named = [v if k == "path" else _named_file(v) for k in ("path", "url") if isinstance(v := value.get(k), str)]
        if named:  # a file value: each of its names must be the same owned file
            found = {owned(v) for v in named}
            if None in found or len(found) != 1:
                raise ForeignFile(named[0])
            out["path"], out["url"] = str(found.pop()), None
        return out
    if isinstance(value, list):
        return [own_files(item, owned, mentions) for item in value]
    return value


def _named_file(url: str) -> str:
    """The file a file value's `url` names: only through this page's own file route."""
    parts = urlsplit(url)
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
            return await self.app(scope, receive, self._claiming(send, None))
        if local.endswith("/upload") or local.endswith("/upload/"):
            if tenant is None:
                return await _answer(send, 401, "sign in with your API token before uploading")
            return await self.app(scope, receive, self._claiming(send, tenant))
        if method in ("POST", "PUT", "PATCH"):
            body = await _read_body(receive)
            if body is None:
                return await _answer(send, 413, f"the request is over {MAX_BODY} bytes")
            try:
                data = json.loads(body) if body.strip() else None
                data = own_files(data, lambda v: self.files.owned_by(tenant, v), self.files.mentions)
            except ForeignFile:
                return await _answer(send, 403, "a file in this request was not uploaded with your token: "
                                                "upload it again from this page")
            except (ValueError, RecursionError):
                return await _answer(send, 400, "the page sends JSON here")
            body = json.dumps(data).encode() if data is not None else body
            scope = dict(scope, headers=[(k, str(len(body)).encode() if k.lower() == b"content-length" else v)
                                         for k, v in scope["headers"]])
            return await self.app(scope, _replay(body, receive), self._claiming(send, tenant))
        return await self.app(scope, receive, self._claiming(send, tenant))

    async def _sign_in(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        # JSON only, from this page's own origin: a cross-site form cannot sign a browser in (login CSRF).
        if not headers.get("content-type", "").startswith("application/json"):
            return await _answer(send, 415, "send the token as JSON")
        origin = headers.get("origin")
        if origin and urlsplit(origin).netloc != headers.get("host"):
            return await _answer(send, 403, "sign in from the page itself")
        body = await _read_body(receive) or b"{}"
        try:
            token = str(json.loads(body).get("token") or "")
        except (ValueError, AttributeError):
            token = ""
        tenant = auth.tenant_for(headers.get("authorization") or f"Bearer {token.strip()}", self.tokens)
        where = scope.get("root_path") or "/"
        secure = "; Secure" if (scope.get("scheme") == "https" or headers.get("x-forwarded-proto") == "https") else ""
        if tenant is None:  # a wrong token also ends the browser's earlier session
            return await _answer(send, 401, "the API token is missing or not valid",
                                 cookie=f"{COOKIE}=; Max-Age=0; Path={where}; HttpOnly; SameSite=Strict{secure}")
        cookie = (f"{COOKIE}={self._new_session(tenant)}; Max-Age={SESSION_S}; Path={where}; HttpOnly; "
                  f"SameSite=Strict{secure}")
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
    body = json.dumps({"error": {401: "unauthorized", 403: "forbidden", 404: "not_found", 413: "too_large",
                                 415: "unsupported_media_type"}.get(
        status, "ok" if status < 400 else "bad_request"), "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if cookie:
        headers.append((b"set-cookie", cookie.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

"""The page gate's file rules without a server: a file value names a file of the caller's tenant
taken literally (no decoding, no `..`, no symlink, no foreign URL), and is rewritten to that file."""
import os

import pytest

from deployments.page_gate import ALIAS, ForeignFile, PageFiles, own_files


@pytest.fixture
def files(tmp_path):
    root = tmp_path / "page"
    (root / "h1").mkdir(parents=True)
    (root / "h1" / "a.png").write_bytes(b"a")
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", root / "h1" / "link.png")
    page = PageFiles(root)
    page.claim("acme", page.resolve(f"{ALIAS}/h1/a.png"))
    page.claim("acme", root / "h1" / "link.png")
    return page


def test_a_file_value_is_rewritten_to_the_owned_file_it_names(files):
    owned = files.root / "h1" / "a.png"
    data = [{"path": f"{ALIAS}/h1/a.png", "url": f"http://host/ui/gradio_api/file={ALIAS}/h1/a.png", "meta": {}}]
    assert own_files(data, lambda v: files.owned_by("acme", v)) == [{"path": str(owned), "url": None, "meta": {}}]
    assert own_files({"text": f"{ALIAS}/h1/a.png"}, lambda v: None) == {"text": f"{ALIAS}/h1/a.png"}  # not a file


@pytest.mark.parametrize("value", [
    f"{ALIAS}/h1/../h1/a.png",  # `..` as text: Gradio's abspath and a resolver may disagree
    f"{ALIAS}/h1%2Fa.png", f"{ALIAS}/h1/a.png%00",  # encoded: Gradio does not decode
    f"{ALIAS}/h1/link.png",  # a symlink out of the folder
    "/etc/passwd", "../../etc/passwd", f"{ALIAS}/", "http://elsewhere/x",
])
def test_anything_else_is_foreign(files, value):
    with pytest.raises(ForeignFile):
        own_files({"path": value}, lambda v: files.owned_by("acme", v))


def test_another_tenant_and_a_foreign_url_are_foreign(files):
    with pytest.raises(ForeignFile):
        own_files({"path": f"{ALIAS}/h1/a.png"}, lambda v: files.owned_by("other", v))
    with pytest.raises(ForeignFile):  # the url names a file through a route that is not the page's
        own_files({"path": f"{ALIAS}/h1/a.png", "url": f"http://evil/x?file={ALIAS}/h1/a.png"},
                  lambda v: files.owned_by("acme", v))


def test_a_shared_file_stays_for_its_other_owner_when_one_tenant_forgets(files):
    path = files.root / "h1" / "a.png"
    files.claim("other", path)
    assert files.forget_tenant("acme") == 1  # the symlink entry only: the photo is also other's
    assert path.exists() and files.owned_by("other", f"{ALIAS}/h1/a.png") == path
    assert files.owned_by("acme", f"{ALIAS}/h1/a.png") is None
    assert files.forget_tenant("other") == 1 and not path.exists()


def test_a_text_naming_another_tenants_file_is_refused_before_gradio_can_echo_it(files):
    """From the security probe: a plain text (not a file value) holding another tenant's page file's
    real path was passed to Gradio, whose answer repeated it ("Value: ... is not in the list of
    choices"); every page file an answer names is claimed for the caller, so the file became theirs."""
    import asyncio
    import json

    from deployments.page_gate import PageGate

    echoed = []

    async def gradio(scope, receive, send):  # answers as Gradio does a value outside a dropdown's choices
        body = (await receive())["body"]
        echoed.append(body)
        said = json.dumps({"error": f"Value: {json.loads(body)['data'][0]} is not in the list of choices"})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": said.encode()})

    gate = PageGate(gradio, files, {"acme": "acme-token-0123456789", "other": "other-token-0123456789"})

    def call(token: str, value) -> int:
        body, sent = json.dumps({"data": [value]}).encode(), []

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "path": "/ui/gradio_api/call/catalog", "method": "POST",
                 "headers": [(b"authorization", f"Bearer {token}".encode()), (b"content-length", str(len(body)).encode())]}
        asyncio.run(gate(scope, receive, send))
        return sent[0]["status"]

    acme_file = str(files.root / "h1" / "a.png")
    for value in (acme_file, f"see {acme_file}", {acme_file: 1}):
        assert call("other-token-0123456789", value) == 403 and not echoed
    assert files.owned_by("other", f"{ALIAS}/h1/a.png") is None  # still acme's alone
    assert call("acme-token-0123456789", acme_file) == 200  # its owner may name it
    assert call("other-token-0123456789", "a portrait") == 200  # any other text passes as it is

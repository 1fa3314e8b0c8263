"""Loading the IMR and the attribute flow for a pipeline: every command, the render job and the
Serve Generator go through here, so a module made for another adapter or encoder is refused the
same way everywhere (AdapterMismatch / EncoderMismatch, a 409 in the API)."""
from __future__ import annotations


def load_edit_modules(adapter, imr_uri: str | None, flow_uri: str | None) -> tuple:
    """(imr, flow), each None where no URI is given; checked against `adapter`'s hash and encoder."""
    from ray_faceid.errors import BadInput
    from ray_faceid.identity.flow import load_flow
    from ray_faceid.identity.imr import load_imr

    if (imr_uri or flow_uri) and adapter is None:
        raise BadInput("--imr and --flow work on an identity adapter's input: pass --adapter")
    encoder = None if adapter is None else adapter.encoder_spec.key()
    imr = load_imr(imr_uri, adapter.content_hash(), encoder) if imr_uri else None
    flow = load_flow(flow_uri, encoder) if flow_uri else None
    return imr, flow

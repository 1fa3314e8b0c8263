"""Identity on FLUX: identity tokens attended to by the image in every dual-stream block, as the FLUX
IP-Adapter does (XLabs-AI/flux-ip-adapter, the layout diffusers' FluxIPAdapterMixin loads).

In each dual-stream block the image's queries (after their RMS norm, before the rotary positions)
attend to the identity tokens through the block's own `to_k_ip` / `to_v_ip`; the result, times each
person's strength, adds to the image stream after the block's feed-forward. Single-stream blocks are
left as they are. Several people: each image patch takes the tokens of the person whose region
covers it (identity/routing.py, on the grid of packed 2x2 patches), nobody else's.

Every request's tokens, strengths and regions are inputs of the transformer call (its
`joint_attention_kwargs`), never state on the modules: requests sharing the transformer cannot see
each other's people.

The published file: `.safetensors` with `ip_adapter_proj_model.{proj,norm}.*` (a linear map of the
reference's image embedding to 4 tokens, layer-normed) and
`double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}`, or the same as a
`.bin` of `image_proj` (`proj.*`, `norm.*`) and `ip_adapter` (`{i}.to_{k,v}_ip.*`). Its input is a
CLIP image embedding (ViT-L/14's 768-d for XLabs' file), given as an embedding file.
"""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ray_faceid import storage
from ray_faceid.errors import BadInput, UnsupportedModel
from ray_faceid.weights_hash import weights_hash_of

log = logging.getLogger(__name__)
TOKENS = 4  # diffusers' FLUX loader: 4 tokens (16 for a projection of 65,536 rows)
LICENCE = ("FLUX IP-Adapter weights (XLabs-AI/flux-ip-adapter): FLUX.1 [dev] Non-Commercial License, as the base "
           "they were trained on")


class IdentityOnImage:
    """A dual-stream block's attention: FLUX's own, then the identity tokens' attention of the
    image queries (None: the block as FLUX made it). With a personal bank (identity/personal_bank.py),
    `personal_slots` (B, M) gives each person of each row their own `to_k_ip` / `to_v_ip` (a slot 0:
    the shared ones): each person's projections read their own tokens only, so a person's own adapter
    applies beside other people in one image too."""

    def __init__(self, to_k_ip: nn.Linear, to_v_ip: nn.Linear, bank=None, index: int = 0):
        self.to_k_ip, self.to_v_ip, self.bank, self.index = to_k_ip, to_v_ip, bank, index

    def _project(self, linear: nn.Linear, part: str, tokens: torch.Tensor, slots) -> torch.Tensor:
        if slots is None or self.bank is None:
            return linear(tokens)
        from ray_faceid.identity.personal_bank import PersonalRows

        return PersonalRows(self.bank, slots).project(linear, f"to_{part}_ip.{self.index}.weight", tokens)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 identity_tokens=None, identity_scale=None, patch_owner=None, personal_slots=None):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        out = FluxAttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if identity_tokens is None or encoder_hidden_states is None:
            return out
        image, text = out
        b, n, _ = hidden_states.shape
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))).transpose(1, 2)
        added = torch.zeros_like(image)
        for m in range(identity_tokens.shape[1]):  # each person's tokens, scale and patches
            tokens = identity_tokens[:, m].to(query.dtype)
            slots = None if personal_slots is None else personal_slots[:, m]
            key = self._project(self.to_k_ip, "k", tokens, slots).view(b, -1, attn.heads, attn.head_dim).transpose(1, 2)
            value = self._project(self.to_v_ip, "v", tokens, slots).view(b, -1, attn.heads, attn.head_dim
                                                                          ).transpose(1, 2)
            taken = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).reshape(b, n, -1)
            weight = identity_scale[:, m].to(taken.dtype).view(b, 1, 1)
            if patch_owner is not None:
                weight = weight * patch_owner[:, :, m : m + 1].to(taken.dtype)
            added = added + weight * taken.to(image.dtype)
        return image, text, added


class AcceptingIdentity:
    """A single-stream block's attention, unchanged: it takes the identity inputs every block is
    given and leaves them (FLUX's own processor would warn of each at every step)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 identity_tokens=None, identity_scale=None, patch_owner=None, personal_slots=None):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        return FluxAttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


class FluxIdentityAdapter(nn.Module):
    """The projection of a reference embedding to identity tokens, and each dual-stream block's
    `to_k_ip` / `to_v_ip`."""

    def __init__(self, embed_dim: int, width: int, inner: int, blocks: int, tokens: int = TOKENS):
        super().__init__()
        self.embed_dim, self.tokens_per_person, self.width = embed_dim, tokens, width
        self.proj = nn.Linear(embed_dim, tokens * width)
        self.norm = nn.LayerNorm(width)
        self.to_k_ip = nn.ModuleList(nn.Linear(width, inner) for _ in range(blocks))
        self.to_v_ip = nn.ModuleList(nn.Linear(width, inner) for _ in range(blocks))
        self.published: dict | None = None
        self.image_encoder = self.identitynet = None  # what personal adapters of a UNet adapter are keyed by too
        # What personalize trains (each block's identity projections) and keeps (the projection to
        # tokens); not registered: the file's names and the weights hash stay those of the layout.
        object.__setattr__(self, "processors", nn.ModuleDict({"to_k_ip": self.to_k_ip, "to_v_ip": self.to_v_ip}))
        object.__setattr__(self, "mapper", nn.ModuleDict({"proj": self.proj, "norm": self.norm}))
        self.trained: dict | None = None
        """What `ray-faceid train` recorded of an adapter it made (identity/flux_training.py)."""
        self.encoder_spec = None
        """The face encoder whose identity embeddings it reads (ours); None: CLIP image embeddings (XLabs')."""

    def tokens(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, D) reference embeddings -> (B, T, C) identity tokens. Ours reads identity embeddings at unit
        length (training's fused and single ones, and generation's, alike)."""
        if self.encoder_spec is not None:
            embedding = F.normalize(embedding.float(), dim=-1)
        return self.norm(self.proj(embedding.to(self.proj.weight.dtype)).reshape(-1, self.tokens_per_person, self.width))

    @property
    def dtype(self) -> torch.dtype:
        return self.proj.weight.dtype

    class kind:  # noqa: N801 - what personalize asks of an adapter's kind (identity/kinds.py): one embedding a person
        per_photo = identitynet = False

    def takes(self, spec) -> bool:
        """Whether people's stored embeddings of encoder `spec` are what it reads (ours: its encoder's;
        XLabs' file reads CLIP image embeddings of the photos, none stored)."""
        return self.encoder_spec is not None and spec.key() == self.encoder_spec.key()

    @property
    def trained_steps(self) -> int:
        """The optimiser steps `ray-faceid train` gave it (0 for a published file)."""
        return int((self.trained or {}).get("trained_steps", 0))

    @property
    def structure(self) -> str:
        """What the compiled transformer's graph holds of it (its engine key)."""
        return (f"FLUX IP-Adapter: {self.tokens_per_person} tokens of {self.width} from {self.embed_dim}-d embeddings "
                f"on {len(self.to_k_ip)} dual-stream blocks" + (", people's own projections per row" if self.trained
                                                                 else ""))

    @torch.no_grad()
    def person_tokens(self, embeddings: np.ndarray, name: str, device, quality=None) -> torch.Tensor:
        """(T, C) tokens of one person, from the mean of their N x D reference embeddings (ours: fused by
        `quality`, as training fuses a person's references), checked."""
        emb = np.asarray(embeddings, np.float32)
        emb = emb[None] if emb.ndim == 1 else emb
        if emb.ndim != 2 or not len(emb) or emb.shape[-1] != self.embed_dim or not np.isfinite(emb).all():
            what = "image" if self.encoder_spec is None else f"{self.encoder_spec.key()} identity"
            raise BadInput(f"identity {name}: this FLUX IP-Adapter reads N x {self.embed_dim} finite {what} "
                           f"embeddings, got shape {emb.shape}")
        mean = torch.from_numpy(emb).to(device).mean(0, keepdim=True)
        if self.encoder_spec is not None:  # identity embeddings: the references' unit rows fused, as trained
            from ray_faceid.identity.tokens import fuse_embeddings

            quality = None if quality is None else torch.as_tensor(np.asarray(quality, np.float32), device=device)
            mean = fuse_embeddings(torch.from_numpy(emb).to(device), quality)[None]
        made = self.tokens(mean)
        if not torch.isfinite(made).all():  # finite but huge embeddings overflow the projection
            raise BadInput(f"identity {name}: its image embedding is out of range (its tokens overflow)")
        return made[0]

    def install(self, transformer, bank=None) -> None:
        """Every dual-stream block's attention reads identity (`bank`: people's own projections, per
        row and person); single-stream blocks accept its inputs."""
        if len(transformer.transformer_blocks) != len(self.to_k_ip):
            raise UnsupportedModel(f"this FLUX IP-Adapter has {len(self.to_k_ip)} dual-stream blocks' weights; the "
                                   f"base has {len(transformer.transformer_blocks)}: it was made for another model")
        # set_processor: a processor diffusers loaded before may be a child module of the attention.
        for i, (block, k, v) in enumerate(zip(transformer.transformer_blocks, self.to_k_ip, self.to_v_ip)):
            block.attn.set_processor(IdentityOnImage(k, v, bank, i))
        for block in transformer.single_transformer_blocks:
            block.attn.set_processor(AcceptingIdentity())

    def content_hash(self) -> str:
        return weights_hash_of(self)


def load_flux_adapter(uri: str, transformer=None) -> FluxIdentityAdapter:
    """A FLUX IP-Adapter file (either layout) for `transformer`, loaded strictly; one line says what
    was recognised, and a file of another layout or width is refused in one line. Without a
    transformer its widths and blocks are the file's (a driver reads it without loading a base)."""
    uri = adapter_file(uri)
    raw = storage.read_bytes(uri)
    digest = hashlib.sha256(raw).hexdigest()
    proj, ip = _split(raw, uri)
    if "proj.weight" not in proj or "norm.weight" not in proj:
        raise UnsupportedModel(f"{uri}: no FLUX IP-Adapter projection (ip_adapter_proj_model.proj / .norm): not the "
                               "XLabs FLUX IP-Adapter layout")
    if transformer is None:
        blocks = len([k for k in ip if k.endswith("to_k_ip.weight")])
        if not blocks:
            raise UnsupportedModel(f"{uri}: no identity attention (double_blocks.*.ip_adapter_double_stream_k_proj)")
        width, inner = proj["norm.weight"].shape[0], next(v for k, v in ip.items() if k.endswith("to_k_ip.weight")
                                                          ).shape[0]
    else:
        config = transformer.config
        width, inner = config.joint_attention_dim, config.num_attention_heads * config.attention_head_dim
        blocks = len(transformer.transformer_blocks)
    from ray_faceid.identity.flux_training import made_by_training

    made = made_by_training(_metadata(raw, uri), uri)  # ours says its token count; XLabs' have 4 (16 at 65,536 rows)
    rows, embed_dim = proj["proj.weight"].shape
    tokens = int(made["tokens"]) if made else 16 if rows == 65536 else TOKENS
    if rows != tokens * width or proj["norm.weight"].shape[0] != width:
        raise UnsupportedModel(f"{uri}: a FLUX IP-Adapter of {rows // tokens}-wide tokens; this base's transformer "
                               f"reads {width}-wide text states: it was made for another model")
    adapter = FluxIdentityAdapter(embed_dim, width, inner, blocks, tokens)
    state = {f"proj.{k.split('.', 1)[1]}": v for k, v in proj.items() if k.startswith("proj.")}
    state.update({f"norm.{k.split('.', 1)[1]}": v for k, v in proj.items() if k.startswith("norm.")})
    for i in range(blocks):
        for part in ("k", "v"):
            for field in ("weight", "bias"):
                key = f"{i}.to_{part}_ip.{field}"
                if key not in ip:
                    published_key = f"double_blocks.{i}.processor.ip_adapter_double_stream_{part}_proj.{field}"
                    raise UnsupportedModel(f"{uri}: its identity attention lacks {published_key} (it has {len(ip)} "
                                           f"tensors for {blocks} dual-stream blocks): made for another FLUX model")
                state[f"to_{part}_ip.{i}.{field}"] = ip[key]
    extra = set(ip) - {f"{i}.to_{p}_ip.{f}" for i in range(blocks) for p in "kv" for f in ("weight", "bias")}
    if extra:
        raise UnsupportedModel(f"{uri}: {len(extra)} identity-attention tensors beyond this base's {blocks} dual-stream "
                               f"blocks (e.g. {sorted(extra)[0]}): made for another FLUX model")
    try:
        adapter.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # the first mismatch diffusers' names say, e.g. "size mismatch for proj.weight ..."
        said = " ".join(line.strip() for line in str(exc).splitlines()[1:3])[:240]
        raise UnsupportedModel(f"{uri}: its tensors do not fit this base ({said})") from None
    if made is not None:  # ours: reads the face stack's identity embeddings
        adapter.encoder_spec = made.pop("encoder_spec")
        adapter.trained = made
        log.warning("recognised a FLUX identity adapter `ray-faceid train` made: %d identity tokens from %s "
                    "embeddings, %d steps", tokens, adapter.encoder_spec.key(), made["trained_steps"])
        return adapter.eval().requires_grad_(False)
    adapter.published = {"kind": "FLUX IP-Adapter", "variant": "XLabs", "file": Path(uri).name, "sha256": digest,
                         "tokens": tokens, "embedding_dim": embed_dim, "licence": LICENCE}
    log.warning("recognised a FLUX IP-Adapter: %d identity tokens from %d-d image embeddings, %d dual-stream block%s",
                tokens, embed_dim, blocks, "" if blocks == 1 else "s")
    return adapter.eval().requires_grad_(False)


def adapter_file(uri: str) -> str:
    """The file of a FLUX identity adapter: `uri` itself, or in a folder `ray-faceid train` wrote, its file."""
    from ray_faceid.identity.flux_training import ADAPTER_FILE

    if not str(uri).endswith((".safetensors", ".bin")) and storage.exists(storage.join(uri, ADAPTER_FILE)):
        return storage.join(uri, ADAPTER_FILE)
    return uri


def trained_encoder(uri: str):
    """The face encoder (EncoderSpec) a FLUX adapter `ray-faceid train` made reads, from the file's header
    alone (before any base loads); None for a published file or one that cannot be read (its loader says why)."""
    made = trained_record(uri)
    return None if made is None else made["encoder_spec"]


def trained_record(uri: str) -> dict | None:
    """What made a FLUX adapter `ray-faceid train` made (flux_training.made_by_training: encoder, base
    weights hash, steps), from the file's header alone; None for a published file or an unreadable one."""
    from ray_faceid.identity.flux_training import made_by_training
    from ray_faceid.weight_files import safetensors_header

    uri = adapter_file(uri)
    if not uri.endswith(".safetensors"):
        return None
    try:
        metadata = safetensors_header(uri).get("__metadata__")
    except Exception:  # noqa: BLE001 - a damaged or missing file: its loader says what is wrong
        return None
    return made_by_training(metadata, uri)  # a damaged record of ours: one line


def _metadata(raw: bytes, uri: str) -> dict | None:
    """A safetensors file's `__metadata__` (its JSON header's), None for a .bin or an unreadable header."""
    import json

    if not uri.endswith(".safetensors") or len(raw) < 8:
        return None
    size = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8:8 + size])
    except ValueError:
        return None
    return header.get("__metadata__") if isinstance(header, dict) else None


def load_flux_identity(uri: str, transformer):
    """The identity file a FLUX base takes: PuLID-FLUX's (identity/pulid_flux.py) or a FLUX IP-Adapter."""
    from ray_faceid.identity.pulid_flux import is_pulid_file, load_pulid_flux

    return load_pulid_flux(uri, transformer) if is_pulid_file(uri) else load_flux_adapter(uri, transformer)


def check_given_embeddings(uri: str, people: dict[str, np.ndarray]) -> None:
    """People given as arrays (--face-embedding) checked against what the FLUX identity file reads, from
    its header, before the base loads (minutes for FLUX.1): PuLID-FLUX's T x C ID tokens (N x T x C from
    N photos), a FLUX IP-Adapter's D-wide image embeddings (N x D). The loaders say why an unreadable
    file is refused: nothing is said of it here."""
    from ray_faceid.identity.pulid_flux import is_pulid_file
    from ray_faceid.weight_files import header_shapes

    if not people:
        return
    if is_pulid_file(uri):
        shapes = header_shapes(uri)
        latents, out = shapes.get("pulid_encoder.latents"), shapes.get("pulid_encoder.proj_out")
        if not (latents and out and len(latents) == 3 and len(out) == 2):
            return
        per_photo = (latents[1], out[1])
        said = (f"PuLID-FLUX takes its ID tokens, {per_photo[0]} x {per_photo[1]} finite numbers (PuLID's "
                "get_id_embedding)")
    else:
        rows = _projection_shape(uri)
        if rows is None:
            return
        per_photo = (rows[1],)
        ours = trained_encoder(uri)
        what = "image" if ours is None else f"{ours.key()} identity"
        said = f"this FLUX IP-Adapter reads N x {per_photo[0]} finite {what} embeddings"
    for name, value in people.items():
        shape = tuple(np.shape(value))
        if shape[-len(per_photo):] != per_photo or len(shape) > len(per_photo) + 1:
            raise BadInput(f"identity {name}: {said}, got shape {shape}")


def _projection_shape(uri: str) -> list[int] | None:
    """The FLUX IP-Adapter projection's weight shape (rows, embedding width), or None where unreadable."""
    from ray_faceid.weight_files import header_shapes

    uri = adapter_file(uri)
    if uri.endswith(".safetensors"):
        try:
            shapes = header_shapes(uri)
        except Exception:  # noqa: BLE001 - a damaged or missing file: its loader says what is wrong
            return None
        found = shapes.get("ip_adapter_proj_model.proj.weight") or shapes.get("image_proj.proj.weight")
        return found if found and len(found) == 2 else None
    try:
        proj, _ = _split(storage.read_bytes(uri), uri)
    except Exception:  # noqa: BLE001
        return None
    weight = proj.get("proj.weight")
    return None if weight is None or weight.ndim != 2 else list(weight.shape)


def check_flux_adapter_file(uri: str) -> None:
    """A FLUX IP-Adapter file of either layout, read without a base (a Serve config is checked before
    any replica loads one): its projection and identity attention are there, or one line says not."""
    uri = adapter_file(uri)
    proj, ip = _split(storage.read_bytes(uri), uri)
    if "proj.weight" not in proj or "norm.weight" not in proj or not any(k.endswith("to_k_ip.weight") for k in ip):
        raise UnsupportedModel(f"{uri}: not the XLabs FLUX IP-Adapter layout (ip_adapter_proj_model.proj / .norm and "
                               "double_blocks.*.ip_adapter_double_stream_k_proj): a FLUX deployment takes that file")


def _split(raw: bytes, uri: str) -> tuple[dict, dict]:
    """(image projection, identity attention) tensors of either layout, by their diffusers names."""
    if uri.endswith(".safetensors"):
        from safetensors.torch import load

        try:
            flat = load(raw)
        except Exception as exc:  # noqa: BLE001 - a damaged file raises many types
            raise UnsupportedModel(f"{uri}: not a readable safetensors file ({type(exc).__name__})") from None
        proj, ip = {}, {}
        for key, value in flat.items():
            if key.startswith(("ip_adapter_proj_model.", "image_proj.")):
                proj[key.split(".", 1)[1]] = value
            elif key.startswith(("double_blocks.", "ip_adapter.")):
                name = (key.split(".", 1)[1].replace("ip_adapter_double_stream_k_proj", "to_k_ip")
                        .replace("ip_adapter_double_stream_v_proj", "to_v_ip").replace("processor.", ""))
                ip[name] = value
        return proj, ip
    try:
        parts = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedModel(f"{uri}: not a readable torch file ({type(exc).__name__})") from None
    if not isinstance(parts, dict) or set(parts) != {"image_proj", "ip_adapter"}:
        raise UnsupportedModel(f"{uri}: a FLUX IP-Adapter .bin holds image_proj and ip_adapter, nothing else")
    return dict(parts["image_proj"]), dict(parts["ip_adapter"])


def patch_owner(boxes: list, h: int, w: int, batch: int) -> torch.Tensor:
    """(B, N, M) which person each packed patch takes (N = h/2 x w/2 patches of h x w latents, row
    by row): the person whose region covers most of it."""
    from ray_faceid.identity.routing import box_masks, query_routing

    try:
        masks = box_masks(boxes, h // 2, w // 2)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    return query_routing(masks[None].expand(batch, -1, -1, -1), (h // 2) * (w // 2))

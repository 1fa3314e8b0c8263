"""PuLID-FLUX (Guo et al., PuLID: pure and lightning ID customization; guozinan/PuLID's
`pulid_flux_v0.9.*.safetensors`) on our FLUX transformer.

The file holds two parts, loaded strictly under their published names:
- `pulid_encoder.*`, the IDFormer: a perceiver whose queries attend over the face's ArcFace
  embedding (antelopev2's, 512-d, raw) joined to its EVA-CLIP embedding (768-d, unit length), and
  over five EVA-CLIP hidden states, giving 32 ID tokens of 2048;
- `pulid_ca.{j}.*`, cross-attentions from the image stream to the ID tokens, whose output times the
  person's weight adds to the image stream after every 2nd dual-stream block and every 4th
  single-stream block (their authors' intervals), in that order.

Here the residuals run through forward hooks on those blocks that read the call's identity inputs
(`joint_attention_kwargs`: each row's people's tokens, weights and patches), never state on the
modules: requests sharing the transformer cannot see each other's people. Several people: each patch
takes the residual of the person whose region covers it.

A person comes as photos (or an enrolled person's reference crops) read by PuLID's encoders
(identity/pulid_faces.py: antelopev2's ArcFace, EVA02-CLIP-L-14-336, BiSeNet's face parsing, from
files the user gives), as the ID tokens PuLID's own pipeline gives (`get_id_embedding`, 32 x 2048),
or as those encoders' outputs (`encode`). PuLID's code is no package to compare with: the tests
write its loop and attention out from their description and the hooked transformer must match them;
the encoders are checked against their authors' code (tests/face/test_pulid_encoders.py).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ray_faceid import storage
from ray_faceid.errors import BadInput, UnsupportedModel
from ray_faceid.identity.face_plus import PerceiverAttention, feed_forward
from ray_faceid.weight_files import header_shapes
from ray_faceid.weights_hash import weights_hash_of

log = logging.getLogger(__name__)
DOUBLE_INTERVAL, SINGLE_INTERVAL = 2, 4  # a residual after dual-stream blocks 0, 2, 4...; single-stream 0, 4, 8...
SCALES = 5  # EVA-CLIP hidden states the IDFormer reads, one per group of its layers
CA_HEAD_WIDTH = 128
EVA_HIDDEN_TOKENS = 1 + 24 * 24  # EVA02-CLIP-L-14-336's class token and patches: the hidden states PuLID reads
LICENCE = ("PuLID-FLUX weights (guozinan/PuLID): used with FLUX.1 [dev], under the FLUX.1 [dev] Non-Commercial "
           "License; its face embeddings come from insightface's antelopev2 pack, also non-commercial")


def _mlp(inputs: int, width: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, width), nn.LayerNorm(width), nn.LeakyReLU(), nn.Linear(width, width),
                         nn.LayerNorm(width), nn.LeakyReLU(), nn.Linear(width, out))


class IdFormer(nn.Module):
    """The face's embeddings and EVA-CLIP hidden states -> ID tokens (`pulid_encoder.*`)."""

    def __init__(self, dim: int, depth: int, inner: int, queries: int, id_tokens: int, id_input: int,
                 vit_width: int, mapping_width: int, output_dim: int):
        super().__init__()
        self.dim, self.id_tokens, self.queries = dim, id_tokens, queries
        self.latents = nn.Parameter(torch.zeros(1, queries, dim))
        self.proj_out = nn.Parameter(torch.zeros(dim, output_dim))
        self.layers = nn.ModuleList([nn.ModuleList([PerceiverAttention(dim, inner), feed_forward(dim)])
                                     for _ in range(depth)])
        for i in range(SCALES):
            setattr(self, f"mapping_{i}", _mlp(vit_width, mapping_width, dim))
        self.id_embedding_mapping = _mlp(id_input, mapping_width, dim * id_tokens)

    def forward(self, id_cond: torch.Tensor, hidden: list[torch.Tensor]) -> torch.Tensor:
        """(B, 512 + 768) embeddings and SCALES x (B, S, W) hidden states -> (B, queries, output_dim)."""
        x = self.id_embedding_mapping(id_cond).reshape(id_cond.shape[0], self.id_tokens, self.dim)
        latents = torch.cat([self.latents.expand(id_cond.shape[0], -1, -1), x], dim=1)
        per_scale = len(self.layers) // SCALES
        for i in range(SCALES):
            context = torch.cat([x, getattr(self, f"mapping_{i}")(hidden[i])], dim=1)
            for attention, ff in self.layers[i * per_scale:(i + 1) * per_scale]:
                latents = attention(context, latents) + latents
                latents = ff(latents) + latents
        return latents[:, :self.queries] @ self.proj_out


class IdCrossAttention(nn.Module):
    """The image stream's queries over one person's ID tokens (`pulid_ca.{j}.*`)."""

    def __init__(self, dim: int, kv_dim: int, inner: int):
        super().__init__()
        self.heads = max(1, inner // CA_HEAD_WIDTH)
        self.norm1, self.norm2 = nn.LayerNorm(kv_dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def queries(self, image: torch.Tensor) -> torch.Tensor:
        b, n, _ = image.shape
        return self.to_q(self.norm2(image)).view(b, n, self.heads, -1).transpose(1, 2)

    def attend(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, inner) of the queries over the tokens, before the output projection."""
        b, _, n, _ = queries.shape
        k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)
                for t in self.to_kv(self.norm1(tokens)).chunk(2, dim=-1))
        return F.scaled_dot_product_attention(queries, k, v).transpose(1, 2).reshape(b, n, -1)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.to_out(self.attend(self.queries(image), tokens))


class IdResidual:
    """A forward hook on a FLUX block: the block's image stream plus each person's ID cross-attention,
    times their weight, on their patches; the identity inputs are the call's own. The queries and the
    output projection (linear, no bias) are shared by the people: computed once a block."""

    def __init__(self, attention: IdCrossAttention):
        self.attention = attention

    def __call__(self, module, args, kwargs, output):
        identity = kwargs.get("joint_attention_kwargs") or {}
        tokens = identity.get("identity_tokens")
        if tokens is None:
            return output
        text, image = output
        weight, owner = identity["identity_scale"], identity.get("patch_owner")
        queries = self.attention.queries(image)
        mixed = 0
        for m in range(tokens.shape[1]):
            w = weight[:, m].to(image.dtype).view(-1, 1, 1)
            if owner is not None:
                w = w * owner[:, :, m:m + 1].to(image.dtype)
            mixed = mixed + w * self.attention.attend(queries, tokens[:, m].to(image.dtype))
        return text, image + self.attention.to_out(mixed)


class PulidFlux(nn.Module):
    """PuLID-FLUX's IDFormer and cross-attentions, as the FLUX generator takes an identity adapter."""

    def __init__(self, encoder: IdFormer, attentions: list[IdCrossAttention]):
        super().__init__()
        self.pulid_encoder = encoder
        self.pulid_ca = nn.ModuleList(attentions)
        self.tokens_per_person, self.width = encoder.queries, encoder.proj_out.shape[1]
        self.published: dict | None = None
        self.trained = self.encoder_spec = None  # the FLUX adapters' interface: ours sets them, PuLID's file none
        self._hooks: list = []

    @property
    def dtype(self) -> torch.dtype:
        return self.pulid_encoder.proj_out.dtype

    @property
    def structure(self) -> str:
        """What the compiled transformer's graph holds of it (its engine key)."""
        return (f"PuLID-FLUX: {self.tokens_per_person} ID tokens of {self.width}, {len(self.pulid_ca)} residuals "
                f"every {DOUBLE_INTERVAL} dual / {SINGLE_INTERVAL} single-stream blocks")

    def person_tokens(self, embeddings: np.ndarray, name: str, device, quality=None) -> torch.Tensor:
        """(T, C) tokens of a person given as PuLID's ID tokens (T x C, or N x T x C from N photos: their mean)."""
        emb = np.asarray(embeddings, np.float32)
        emb = emb[None] if emb.ndim == 2 else emb
        if emb.ndim != 3 or not len(emb) or emb.shape[1:] != (self.tokens_per_person, self.width) or \
                not np.isfinite(emb).all():
            raise BadInput(f"identity {name}: PuLID-FLUX takes its ID tokens, {self.tokens_per_person} x {self.width} "
                           f"finite numbers (PuLID's get_id_embedding), got shape {emb.shape}")
        # Several photos' tokens: their mean (our choice; PuLID's pipeline reads one photo).
        tokens = torch.from_numpy(emb.mean(0)).to(device, self.dtype)
        with torch.no_grad():  # finite but huge tokens overflow the first norm: a black image, said instead
            if not torch.isfinite(self.pulid_ca[0].norm1(tokens)).all():
                raise BadInput(f"identity {name}: its ID tokens are out of range (they overflow PuLID's attention)")
        return tokens

    true_cfg_from = 1  # PuLID's app runs true CFG from step 1 (timestep_to_start_cfg)

    @torch.no_grad()
    def uncond_tokens(self) -> torch.Tensor:
        """(T, C): the IDFormer on zeros, PuLID's uncond_id (its true CFG's negative pass): zeros of the
        embeddings and of EVA02-CLIP-L-14-336's hidden states (their token count weighs the attention)."""
        encoder = self.pulid_encoder
        device, dtype = encoder.latents.device, self.dtype
        hidden = torch.zeros(1, EVA_HIDDEN_TOKENS, encoder.mapping_0[0].in_features, device=device, dtype=dtype)
        cond = torch.zeros(1, encoder.id_embedding_mapping[0].in_features, device=device, dtype=dtype)
        return encoder(cond, [hidden] * SCALES)[0]

    @torch.no_grad()
    def encode(self, id_embedding: torch.Tensor, eva_embedding: torch.Tensor, eva_hidden: list[torch.Tensor]):
        """ID tokens from the face's antelopev2 embedding (raw), EVA-CLIP embedding and hidden states."""
        eva = eva_embedding / eva_embedding.norm(dim=-1, keepdim=True)
        cond = torch.cat([id_embedding, eva], dim=-1).to(self.dtype)
        return self.pulid_encoder(cond, [h.to(self.dtype) for h in eva_hidden])

    def tokens_of(self, features, name: str) -> np.ndarray:
        """N x T x C ID tokens of one person's photos as the encoders read them (identity/pulid_faces.py),
        each photo's own; refused in one line where the encoders' widths are not the ones this file reads."""
        takes = self.pulid_encoder.id_embedding_mapping[0].in_features
        vit = self.pulid_encoder.mapping_0[0].in_features
        given = features.arcface.shape[1] + features.eva.shape[1]
        if given != takes or len(features.hidden) != SCALES or features.hidden[0].shape[-1] != vit:
            raise BadInput(f"identity {name}: this PuLID-FLUX file reads an ArcFace + EVA-CLIP embedding of {takes} "
                           f"and {SCALES} hidden states {vit} wide; the encoders gave {features.arcface.shape[1]} + "
                           f"{features.eva.shape[1]} and {len(features.hidden)} of "
                           f"{features.hidden[0].shape[-1] if features.hidden else 0}: give antelopev2's pack "
                           "(--insightface-root) and EVA02-CLIP-L-14-336")
        device = self.pulid_encoder.latents.device
        tokens = self.encode(features.arcface.to(device), features.eva.to(device), [h.to(device) for h in features.hidden])
        return tokens.float().cpu().numpy()

    def install(self, transformer, bank=None) -> None:
        """The residual hooks on their blocks (a second install replaces the first's); PuLID's file has
        no personal adapters (`bank` None)."""
        from ray_faceid.identity.flux_adapter import AcceptingIdentity

        for hook in self._hooks:
            hook.remove()
        doubles, singles = transformer.transformer_blocks, transformer.single_transformer_blocks
        blocks = list(doubles)[::DOUBLE_INTERVAL] + list(singles)[::SINGLE_INTERVAL]
        if len(blocks) != len(self.pulid_ca):
            raise UnsupportedModel(f"this PuLID-FLUX file has {len(self.pulid_ca)} ID cross-attentions; a base of "
                                   f"{len(doubles)} dual- and {len(singles)} single-stream blocks takes {len(blocks)}: "
                                   "it was made for another model")
        self._hooks = [block.register_forward_hook(IdResidual(ca), with_kwargs=True)
                       for block, ca in zip(blocks, self.pulid_ca)]
        for block in [*doubles, *singles]:  # FLUX's own attention, taking the identity inputs each block is given
            block.attn.set_processor(AcceptingIdentity())

    def content_hash(self) -> str:
        return weights_hash_of(self)


RENDER_READERS = ("PuLID-FLUX renders enrolled people read by its encoders: give --image-encoder FOLDER (EVA02-CLIP and "
                  "its face parser) and --face-backend insightface --insightface-root PACK (antelopev2: its ArcFace)")


def is_pulid_file(uri: str) -> bool:
    """A safetensors file whose tensors are PuLID-FLUX's (read from its header alone)."""
    if not str(uri).endswith(".safetensors"):
        return False
    try:
        keys = _header_keys(uri)
    except Exception:  # noqa: BLE001 - a damaged or missing file is no PuLID file: its loader says what is wrong
        return False
    return any(k.startswith("pulid_encoder.") for k in keys) and any(k.startswith("pulid_ca.") for k in keys)


def _header_keys(uri: str) -> list[str]:
    """The tensor names of a safetensors file's JSON header."""
    return list(header_shapes(uri))


def _modules_of(encoder: dict, ca: dict) -> tuple[IdFormer, list[IdCrossAttention]]:
    """The IDFormer and cross-attentions the tensors' shapes describe (KeyError / ValueError where not)."""
    _, queries, dim = encoder["latents"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in encoder if k.startswith("layers."))
    mapping, first = encoder["mapping_0.0.weight"], encoder["id_embedding_mapping.0.weight"]
    last = encoder["id_embedding_mapping.6.weight"]
    if depth % SCALES:
        raise ValueError(f"{depth} layers")
    former = IdFormer(dim, depth, encoder["layers.0.0.to_q.weight"].shape[0], queries, last.shape[0] // dim,
                      first.shape[1], mapping.shape[1], mapping.shape[0], encoder["proj_out"].shape[1])
    count = 1 + max(int(k.split(".")[0]) for k in ca)
    inner, hidden = ca["0.to_q.weight"].shape
    return former, [IdCrossAttention(hidden, ca["0.to_kv.weight"].shape[1], inner) for _ in range(count)]


def check_pulid_file(uri: str, width: int | None = None) -> None:
    """PuLID-FLUX's layout, read from the file's header alone (a Serve config and a render job are
    checked before any replica or actor loads it): its names and shapes build the IDFormer and
    cross-attentions on the meta device, strictly; `width`: the base transformer's. A file cut short,
    of another layout or for another base is one UnsupportedModel line."""
    from ray_faceid.weight_files import read_tensors

    with torch.device("meta"):
        _pulid_of(read_tensors(uri, "PuLID-FLUX file", meta=True), uri, width)


def _pulid_of(flat: dict, uri: str, width: int | None) -> PulidFlux:
    """The adapter `flat`'s tensors fill, strictly (built on the current device; `width`: the base's)."""
    encoder = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("pulid_encoder.")}
    ca = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("pulid_ca.")}
    others = sorted(k for k in flat if not k.startswith(("pulid_encoder.", "pulid_ca.")))
    if others or "latents" not in encoder or "proj_out" not in encoder or "0.to_q.weight" not in ca:
        raise UnsupportedModel(f"{uri}: not PuLID-FLUX's layout (pulid_encoder.latents, .proj_out, pulid_ca.0.to_q"
                               + (f"; it also holds {others[0]}" if others else "") + ")")
    try:  # its widths, read from the tensors; a damaged layout is refused, not a traceback
        former, attentions = _modules_of(encoder, ca)
    except (KeyError, ValueError, IndexError, TypeError, RuntimeError):
        raise UnsupportedModel(f"{uri}: its tensors lack PuLID-FLUX's layout (pulid_encoder: latents, proj_out, "
                               f"layers in {SCALES} groups, mapping_0..4, id_embedding_mapping; pulid_ca.N: norm1, "
                               "norm2, to_q, to_kv, to_out): the file is damaged or of another kind") from None
    hidden = attentions[0].to_q.in_features
    if width is not None and hidden != width:
        raise UnsupportedModel(f"{uri}: PuLID-FLUX for a {hidden}-wide FLUX transformer; this base's is {width}-wide: "
                               "it was made for another model")
    adapter = PulidFlux(former, attentions)
    try:
        adapter.pulid_encoder.load_state_dict(encoder, strict=True)
        adapter.pulid_ca.load_state_dict(ca, strict=True)
    except RuntimeError as exc:
        said = " ".join(line.strip() for line in str(exc).splitlines()[1:3])[:240]
        raise UnsupportedModel(f"{uri}: its tensors do not fit PuLID-FLUX's layout ({said})") from None
    return adapter


def load_pulid_flux(uri: str, transformer) -> PulidFlux:
    """A PuLID-FLUX file for `transformer`, loaded strictly; one line says what was recognised, and a
    file made for another model is refused in one line."""
    from safetensors.torch import load

    raw = storage.read_bytes(uri)
    try:
        flat = load(raw)
    except Exception as exc:  # noqa: BLE001 - a damaged file raises many types
        raise UnsupportedModel(f"{uri}: not a readable safetensors file ({type(exc).__name__})") from None
    config = transformer.config
    adapter = _pulid_of(flat, uri, config.num_attention_heads * config.attention_head_dim)
    count = len(adapter.pulid_ca)
    adapter.eval().requires_grad_(False)
    if not all(bool(torch.isfinite(p).all()) for p in adapter.parameters()):
        raise UnsupportedModel(f"{uri}: it holds NaN or infinite weights")
    # v0.9.0 and v0.9.1 share one layout: what was recognised is the layout, the file names its version.
    adapter.published = {"kind": "PuLID-FLUX", "variant": f"IDFormer, {count} ID cross-attentions",
                         "file": Path(uri).name, "sha256": hashlib.sha256(raw).hexdigest(), "tokens": adapter.tokens_per_person,
                         "licence": LICENCE}
    log.warning("recognised PuLID-FLUX: %d ID tokens of %d, %d ID cross-attentions", adapter.tokens_per_person,
                adapter.width, count)
    if not config.guidance_embeds:  # schnell: the same blocks, distilled otherwise
        log.warning("PuLID-FLUX was trained on FLUX.1 dev; this base is FLUX.1 schnell: it runs, but its authors publish "
                    "no results there: measure the likeness (`ray-faceid eval`)")
    return adapter

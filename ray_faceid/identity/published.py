"""Identity adapters the field publishes, read from their own files and run as an IdentityAdapter.

IP-Adapter-FaceID (Ye et al., h94/IP-Adapter-FaceID), as its authors save it:

- `.bin`: a torch pickle {"image_proj": {...}, "ip_adapter": {...}} (read with weights_only: no code
  runs); `.safetensors`: the same keys flat, prefixed `image_proj.` and `ip_adapter.`;
- image_proj: `proj.0` (embedding -> hidden), GELU, `proj.2` (hidden -> tokens x width), `norm`
  (LayerNorm over each token): our IdProjector's layout;
- ip_adapter: `{2k+1}.to_k_ip.weight` / `to_v_ip` for the k-th cross-attention layer (in the
  UNet's processor order): our decoupled identity attention's to_k_id / to_v_id;
- the LoRA of every attention layer, `{i}.to_{q,k,v,out}_lora.{down,up}.weight` for the i-th
  processor, embedded in ip_adapter: fused once into the base UNet the adapter is installed on
  (IdentityAdapter.install). The separate `*_lora.safetensors` files (the same LoRA, kohya keys, for
  web UIs) are named for what they are and the .bin asked for.
- InstantID (identity/instantid.py): image_proj is a resampler with learned queries (`latents`) over
  the embedding, ip_adapter FaceID's identity attention; its IdentityNet is a ControlNet folder.
- FaceID-Plus / PlusV2: image_proj adds `perceiver_resampler.*` (face_plus.py), read over the face's
  CLIP image features (face/clip_image.py, an encoder folder the user gives). The two share one
  layout; PlusV2 (its file named so by its authors) adds the embedding's tokens back as a shortcut.

It takes insightface ArcFace embeddings (buffalo_l's w600k_r50, 512-d, normalised), and the
unconditional rows of classifier-free guidance get the tokens of a zero embedding (for Plus, with
the features of a zero image) at the same strength, as its reference pipeline does. FaceID-Portrait
(FaceID's layout, 16 tokens, named so by its authors) gives each reference photo its own tokens,
concatenated, as its reference pipeline does. Licence: the FaceID weights and the insightface packs
are for non-commercial research.
"""
from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import PurePosixPath

import torch

from ray_faceid import storage
from ray_faceid.errors import EncoderMismatch, UnsupportedModel
from ray_faceid.face.spec import EncoderSpec

log = logging.getLogger(__name__)
SUFFIXES = (".bin", ".safetensors", ".pt", ".pth")
FACEID_PROJ = {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight", "norm.bias"}
LORA_PROJECTIONS = {"to_q": ("to_q",), "to_k": ("to_k",), "to_v": ("to_v",), "to_out": ("to_out", "0")}
LICENCE = ("IP-Adapter-FaceID weights (h94/IP-Adapter-FaceID): non-commercial research use; their face "
           "embeddings come from insightface packs, also non-commercial")
FAMILY_OF_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
WIDTH_NAMES = "SD 1.x: 768, SD 2.x: 1024, SDXL: 2048"


def is_published_file(uri: str) -> bool:
    """Whether an --adapter value names a published adapter file (ours is a folder)."""
    return PurePosixPath(str(uri).rstrip("/")).suffix.lower() in SUFFIXES


@dataclass
class Recognised:
    kind: str
    variant: str
    tokens: int
    embedding_dim: int
    width: int
    hidden: int
    lora_rank: int | None
    sha256: str
    image_feature_dim: int = 0
    """FaceID-Plus: the width of the CLIP image features its resampler reads (0: none read)."""
    resampler: tuple[int, int] | None = None
    """FaceID-Plus: (depth, inner attention width) of its perceiver resampler."""
    shortcut: bool = False
    per_photo: bool = False
    """FaceID-Portrait: each reference photo gives its own tokens, concatenated (not one fused embedding)."""
    encoder: str = "buffalo_l's w600k_r50, unit length"
    """The insightface ArcFace its authors embed faces with."""

    @property
    def plus(self) -> bool:
        return self.image_feature_dim > 0

    @property
    def instantid(self) -> bool:
        return self.kind == "InstantID"

    def line(self) -> str:
        lora = f", LoRA rank {self.lora_rank} fused into the base" if self.lora_rank else ", no LoRA"
        clip = f" and {self.image_feature_dim}-d CLIP image features" if self.image_feature_dim else ""
        return (f"recognised {self.kind} ({self.variant}): {self.tokens} identity tokens from {self.embedding_dim}-d "
                f"ArcFace embeddings{clip}, cross-attention width {self.width} "
                f"({FAMILY_OF_WIDTH.get(self.width, 'no published family: checked against the base')}){lora}")


def read(uri: str) -> tuple[dict[str, dict[str, torch.Tensor]], str]:
    """(state dict split into image_proj / ip_adapter, sha256 of the file's bytes)."""
    raw = storage.read_bytes(uri)
    digest = hashlib.sha256(raw).hexdigest()
    if str(uri).lower().endswith(".safetensors"):
        from safetensors.torch import load

        try:
            flat = load(raw)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
            raise UnsupportedModel(f"{uri} is not a readable .safetensors file ({str(exc).splitlines()[0][:120]}): "
                                   "give the published file as its authors ship it") from None
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            head, _, rest = key.partition(".")
            parts.setdefault(head, {})[rest] = value
    else:
        try:
            parts = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a file we cannot take
            raise UnsupportedModel(f"{uri} is not a readable adapter file ({type(exc).__name__}): give the "
                                   "published .bin or .safetensors as its authors ship it") from None
    if not isinstance(parts, dict):
        raise UnsupportedModel(f"{uri} holds no state dict")
    return parts, digest


def lora_of(ip_adapter: dict[str, torch.Tensor]) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """{processor index: {projection: (down, up)}} of the LoRA embedded in a FaceID ip_adapter dict."""
    found: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for key in ip_adapter:
        index, _, rest = key.partition(".")
        for projection in LORA_PROJECTIONS:
            if rest == f"{projection}_lora.down.weight":
                up = ip_adapter.get(f"{index}.{projection}_lora.up.weight")
                if up is None or not index.isdigit():
                    raise UnsupportedModel(f"a LoRA down weight ({key}) without its up weight: the file is damaged")
                found.setdefault(int(index), {})[projection] = (ip_adapter[key], up)
    return found


def is_plus_v2(uri: str) -> bool:
    """PlusV2 shares Plus's layout; its authors name its files so (ip-adapter-faceid-plusv2_sd15.bin)."""
    name = PurePosixPath(str(uri)).name.lower().replace("_", "").replace("-", "")
    return "plusv2" in name


def recognise_plus(proj: dict, ip: dict, digest: str, uri: str) -> Recognised:
    """FaceID-Plus / PlusV2's image_proj: the FaceID projection and a perceiver resampler."""
    resampler = {k.removeprefix("perceiver_resampler."): v for k, v in proj.items() if k.startswith("perceiver_resampler.")}
    depth = sum(1 for k in resampler if k.startswith("layers.") and k.endswith(".0.to_q.weight"))
    needed = {"proj_in.weight", "proj_out.weight", "norm_out.weight", "layers.0.0.to_q.weight"}
    missing = sorted((needed - set(resampler)) or (FACEID_PROJ - set(proj)))
    if missing or not depth:
        raise UnsupportedModel(f"{uri}: a FaceID-Plus resampler without {missing[:3] or 'layers'}: the file is "
                               "damaged or of another layout")
    width = proj["norm.weight"].shape[0]
    tokens = proj["proj.2.weight"].shape[0] // width
    v2 = is_plus_v2(uri)
    return Recognised("IP-Adapter-FaceID", "FaceID-PlusV2, shortcut" if v2 else "FaceID-Plus", tokens,
                      proj["proj.0.weight"].shape[1], width, proj["proj.0.weight"].shape[0], lora_rank(ip), digest,
                      image_feature_dim=resampler["proj_in.weight"].shape[1],
                      resampler=(depth, resampler["layers.0.0.to_q.weight"].shape[0]), shortcut=v2)


def recognise_instantid(proj: dict, ip: dict, digest: str, uri: str) -> Recognised:
    """InstantID's image_proj: learned queries over the embedding (an IP-Adapter-Plus resampler that
    reads CLIP features has the same keys; the encoder check refuses it by its input width)."""
    depth = sum(1 for k in proj if k.startswith("layers.") and k.endswith(".0.to_q.weight"))
    missing = sorted({"proj_out.weight", "norm_out.weight", "layers.0.0.to_q.weight"} - set(proj))
    if missing or not depth or proj["latents"].ndim != 3 or not any(k.endswith(".to_k_ip.weight") for k in ip):
        raise UnsupportedModel(f"{uri}: an InstantID resampler without {missing[:3] or 'layers or identity attention'}"
                               ": the file is damaged or of another layout")
    _, tokens, hidden = proj["latents"].shape
    return Recognised("InstantID", "InstantID, with its IdentityNet", tokens, proj["proj_in.weight"].shape[1],
                      proj["proj_out.weight"].shape[0], hidden, lora_rank(ip), digest,
                      resampler=(depth, proj["layers.0.0.to_q.weight"].shape[0]),
                      encoder="antelopev2's glintr100, as insightface gives it (not unit length)")


def lora_rank(ip: dict) -> int | None:
    return next((down.shape[0] for layer in lora_of(ip).values() for down, _ in layer.values()), None)


def recognise(parts: dict, digest: str, uri: str) -> Recognised:
    lora_layers = [k for k in parts if k.startswith(("lora_unet_", "lora_te"))]
    if lora_layers:  # e.g. ip-adapter-faceid_sd15_lora.safetensors, for web UIs that load the LoRA apart
        raise UnsupportedModel(f"{uri} holds a LoRA alone ({len(lora_layers)} layers, kohya keys): the authors' .bin "
                               "of the same name without `_lora` holds this LoRA and the identity weights: give that "
                               "file as --adapter")
    flux = {"pulid_encoder": "PuLID-FLUX", "ip_adapter_proj_model": "FLUX IP-Adapter (XLabs)",
            "double_blocks": "FLUX IP-Adapter (XLabs)"}
    for head, kind in flux.items():
        if head in parts:
            raise UnsupportedModel(f"{uri} is a {kind} file: it runs on a FLUX.1 base (--model a FLUX folder), not on "
                                   "SD 1.x / SDXL")
    proj, ip = parts.get("image_proj") or {}, parts.get("ip_adapter") or {}
    keys = set(proj)
    if any(k.startswith("perceiver_resampler.") for k in keys):
        return recognise_plus(proj, ip, digest, uri)
    if {"latents", "proj_in.weight"} <= keys:
        return recognise_instantid(proj, ip, digest, uri)
    if keys != FACEID_PROJ or not any(k.endswith(".to_k_ip.weight") for k in ip):
        raise UnsupportedModel(f"{uri}: not an IP-Adapter-FaceID file (image_proj keys {sorted(keys)[:4]}...); "
                               "give an IP-Adapter-FaceID .bin or .safetensors, or a folder `ray-faceid train` wrote")
    width = proj["norm.weight"].shape[0]
    tokens, remainder = divmod(proj["proj.2.weight"].shape[0], width)
    if remainder:
        raise UnsupportedModel(f"{uri}: its projection gives {proj['proj.2.weight'].shape[0]} values, not a whole "
                               f"number of {width}-wide tokens")
    name = PurePosixPath(str(uri)).name.lower()
    if "portrait" in name and "unnorm" in name:
        raise UnsupportedModel(f"{uri}: the unnormalised FaceID-Portrait variant takes raw ArcFace embeddings; "
                               "ray_faceid keeps unit ones: use the normalised Portrait file (ip-adapter-faceid-portrait"
                               "_sd15.bin, -portrait-v11_sd15.bin, -portrait_sdxl.bin)")
    portrait = "portrait" in name  # the authors' name for it; its layout is FaceID's with more tokens
    variant = "FaceID-Portrait, tokens per photo" if portrait else (
        "FaceID" if tokens == 4 else f"FaceID, {tokens} tokens")
    return Recognised("IP-Adapter-FaceID", variant, tokens, proj["proj.0.weight"].shape[1], width,
                      proj["proj.0.weight"].shape[0], lora_rank(ip), digest, per_photo=portrait)


def family_of(uri: str) -> str | None:
    """The base family a published file was made for, from its width (before any base loads); None for
    a width no family has (a tiny stand-in: loading it against the base checks the width itself)."""
    parts, digest = read(uri)
    return FAMILY_OF_WIDTH.get(recognise(parts, digest, uri).width)


def check_encoder(found: Recognised, spec: EncoderSpec | None) -> None:
    if spec is None:
        return
    if spec.dim != found.embedding_dim or spec.name.startswith("dlib"):
        raise EncoderMismatch(f"{found.kind} takes {found.embedding_dim}-d insightface ArcFace embeddings "
                              f"({found.encoder}); the face encoder in use gives {spec.dim}-d {spec.name}: use --face-backend "
                              "insightface --insightface-root PACK (face.backend in the Serve config), or give "
                              "--face-embedding EMB.npy")


def untrainable(uri: str) -> str | None:
    """The variant of a published file training cannot start from (FaceID-Plus reads CLIP image
    features, InstantID an IdentityNet: training rows hold embeddings), read from the file alone."""
    found = recognise(*read(uri), uri)
    return found.variant if found.plus or found.instantid else None


def describe(uri: str) -> Recognised | None:
    """What a published file is, read from the file alone (no base: a Serve config is checked when it
    is read, the file read once); None for an adapter folder `train` wrote."""
    return recognise(*read(uri), uri) if is_published_file(uri) else None


def load(uri: str, unet, encoder_spec: EncoderSpec | None = None, shortcut_scale: float | None = None):
    """An IdentityAdapter from a published file, for `unet` (needed: layers are named by its order);
    `shortcut_scale`: PlusV2's weight of the resampled tokens over the embedding's own (default 1)."""
    from ray_faceid.identity.adapter import AdapterOptions, IdentityAdapter, _key, cross_attention_layers
    from ray_faceid.pipelines.families import unet_family

    if unet is None:
        raise UnsupportedModel(f"{uri}: a published adapter is read against the base it runs on: load the base first")
    parts, digest = read(uri)
    found = recognise(parts, digest, uri)
    family = unet_family(unet.config)
    width = unet.config.cross_attention_dim
    if found.width != width:
        raise UnsupportedModel(f"{uri}: {found.kind} made for a base of cross-attention width {found.width}; this "
                               f"{family.upper()} base has {width} ({WIDTH_NAMES}): use the file made for this family")
    check_encoder(found, encoder_spec)
    if shortcut_scale is not None and not found.shortcut:
        raise UnsupportedModel(f"{uri}: a shortcut scale (--plus-v2-scale) is for FaceID-PlusV2 files (named so by "
                               f"their authors); this one is {found.variant}")
    shortcut_scale = 1.0 if shortcut_scale is None else shortcut_scale
    spec = encoder_spec or EncoderSpec(name="arcface", dim=found.embedding_dim, version="insightface", license=LICENCE,
                                       metric="cosine", threshold=0.6)
    names = list(unet.attn_processors.keys())
    cross = [n for n in names if n.endswith("attn2.processor")]
    ip = parts["ip_adapter"]
    keys = {n: f"{2 * k + 1}" for k, n in enumerate(cross)}  # the authors' numbering: every other processor
    missing = [n for n, i in keys.items() if f"{i}.to_k_ip.weight" not in ip or f"{i}.to_v_ip.weight" not in ip]
    if missing or sum(k.endswith(".to_k_ip.weight") for k in ip) != len(cross):
        raise UnsupportedModel(f"{uri}: its identity attention has {sum(k.endswith('.to_k_ip.weight') for k in ip)} "
                               f"layers; this base has {len(cross)} cross-attention layers: it was made for another "
                               "UNet layout")
    lora = lora_of(ip)
    if any(i >= len(names) for i in lora):
        raise UnsupportedModel(f"{uri}: its LoRA names {max(lora) + 1} attention layers; this base has {len(names)}")
    plus = found.plus
    options = AdapterOptions(method="decoupled", mapper="face_plus" if plus else "instantid" if found.instantid else
                             "projector", num_tokens=found.tokens,
                             mapper_hidden=found.hidden, negative="zero_embedding")
    layers = cross_attention_layers(unet)
    proj = parts["image_proj"]
    if plus:
        from ray_faceid.identity.face_plus import FacePlusMapper

        mapper = FacePlusMapper(found.embedding_dim, width, found.tokens, found.hidden, found.image_feature_dim,
                                *found.resampler, shortcut_scale=shortcut_scale if found.shortcut else None)
        state = {f"mapper.{k}": v for k, v in proj.items()}
    elif found.instantid:
        from ray_faceid.identity.instantid import InstantIDResampler

        mapper = InstantIDResampler(found.embedding_dim, width, found.tokens, found.hidden, *found.resampler)
        state = {f"mapper.{k}": v for k, v in proj.items()}
    else:
        mapper = None
        state = {"mapper.mlp.0.weight": proj["proj.0.weight"], "mapper.mlp.0.bias": proj["proj.0.bias"],
                 "mapper.mlp.2.weight": proj["proj.2.weight"], "mapper.mlp.2.bias": proj["proj.2.bias"],
                 "mapper.norm.weight": proj["norm.weight"], "mapper.norm.bias": proj["norm.bias"]}
    adapter = IdentityAdapter(options, spec, layers, base_hash="", family=family, mapper=mapper)
    for name, index in keys.items():
        state[f"processors.{_key(name)}.to_k_id.weight"] = ip[f"{index}.to_k_ip.weight"]
        state[f"processors.{_key(name)}.to_v_id.weight"] = ip[f"{index}.to_v_ip.weight"]
    try:
        adapter.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:  # a key or shape the layout does not have
        raise UnsupportedModel(f"{uri}: its weights do not fit the {found.variant} layout "
                               f"({str(exc).splitlines()[1].strip()[:160] if len(str(exc).splitlines()) > 1 else exc}): "
                               "the file is damaged or of another layout") from None
    if found.instantid:
        from ray_faceid.identity.instantid import LICENCE as licence
    else:
        licence = LICENCE
    adapter.published = {"kind": found.kind, "variant": found.variant, "sha256": digest, "licence": licence,
                         "lora_rank": found.lora_rank, "file": PurePosixPath(str(uri)).name,
                         **({"per_photo": True} if found.per_photo else {}),
                         **({"shortcut_scale": shortcut_scale} if found.shortcut else {})}
    adapter.base_lora = {names[i]: {p: (d.float(), u.float()) for p, (d, u) in layer.items()} for i, layer in lora.items()}
    log.warning("%s", found.line())
    return adapter


@torch.no_grad()
def fuse_lora(unet, lora: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], tag: str) -> bool:
    """Add each attention layer's LoRA (up @ down, scale 1) to its weights, once per UNet; False if
    this UNet already has it."""
    fused = getattr(unet, "_ray_faceid_fused_lora", set())
    if tag in fused:
        return False
    modules = dict(unet.named_modules())
    updates = []
    for name, layer in lora.items():  # every shape checked before any weight changes
        attention = modules[name.removesuffix(".processor")]
        for projection, (down, up) in layer.items():
            linear = attention
            for part in LORA_PROJECTIONS[projection]:
                linear = linear[int(part)] if part.isdigit() else getattr(linear, part)
            if (up.shape[0], down.shape[1]) != tuple(linear.weight.shape) or up.shape[1] != down.shape[0]:
                raise UnsupportedModel(f"the LoRA of {name}.{projection} is {up.shape[0]}x{down.shape[1]}; the layer "
                                       f"is {tuple(linear.weight.shape)}: it was made for another UNet layout")
            updates.append((linear, up, down))
    for linear, up, down in updates:  # summed in fp32 where the layer is (read on the CPU), stored in its precision
        weight = linear.weight
        up, down = up.to(weight.device, torch.float32), down.to(weight.device, torch.float32)
        weight.copy_((weight.float() + up @ down).to(weight.dtype))
    unet._ray_faceid_fused_lora = fused | {tag}
    return True

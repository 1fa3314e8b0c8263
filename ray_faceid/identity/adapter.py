"""IdentityAdapter: everything a base UNet needs to take an identity, in one saveable module.

It bundles the token mapper (IdProjector or MultiRefMapper) and one identity processor per
cross-attention layer. `install(unet)` swaps the processors in (self-attention keeps the stock
maths) and freezes the base; `remove(unet)` restores the stock processors. `save(uri)` writes
`adapter.safetensors` + `adapter.json` (method options, encoder spec, base UNet weights hash);
`load(uri, unet, encoder_spec)` refuses a mismatched encoder or base.
"""
from __future__ import annotations

import hashlib
import json
from typing import Literal

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from ray_faceid import storage
from ray_faceid.errors import BadInput, BaseModelMismatch, EncoderMismatch, NotFound
from ray_faceid.face.spec import EncoderSpec
from ray_faceid.identity.attention import PROCESSORS, SelfAttnProcessor
from ray_faceid.identity.tokens import IdProjector, MultiRefMapper
from ray_faceid.weights_hash import weights_hash_of

WEIGHTS_FILE, CONFIG_FILE = "adapter.safetensors", "adapter.json"


class AdapterOptions(BaseModel):
    method: Literal["decoupled", "pva"] = Field("decoupled", description="Identity attention: decoupled or PVA joint softmax.")
    mapper: Literal["projector", "multiref", "face_plus", "instantid"] = Field(
        "projector", description="Token mapper: IdProjector (fused embedding), MultiRefMapper (PVA, any number of "
        "refs), FacePlusMapper (a published FaceID-Plus file: embedding and CLIP image features) or "
        "InstantIDResampler (a published InstantID file: learned queries over the raw embedding)."
    )
    num_tokens: int = Field(4, ge=1, le=64, description="Identity tokens per identity (N for projector, K for multiref).")
    expression_dim: int = Field(0, ge=0, description="Size of the expression code (0 disables expression guidance).")
    gate: bool = Field(False, description="SAA semantic-activated gating of the identity output.")
    gate_threshold: float = Field(0.3, ge=0, le=1, description="SAA threshold on the min-max normalised scores.")
    mapper_hidden: int = Field(0, ge=0, description="Hidden width of the projector's MLP; 0: twice the larger of "
                               "the embedding and cross-attention widths (a published adapter sets its own).")
    negative: Literal["none", "zero_embedding"] = Field(
        "none", description="What classifier-free guidance's unconditional rows get: no identity, or the tokens of a "
        "zero embedding at the same strength (IP-Adapter-FaceID's own convention).")


# Options added after adapters were first saved: left out of the config while at their defaults, so
# an adapter saved before keeps its content hash (its version in caches and provenance).
_LATER_OPTIONS = {"mapper_hidden": 0, "negative": "none"}


def base_unet_hash(unet) -> str:
    """The hash of the base UNet's weights (taken when it was loaded): adapters are tied to it."""
    return weights_hash_of(unet)


def cross_attention_layers(unet) -> dict[str, tuple[int, int]]:
    """{processor name: (hidden size, cross-attention dim)} of every cross-attention layer."""
    layers = {}
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "to_k"):
            layers[f"{name}.processor"] = (module.to_q.out_features, module.to_k.in_features)
    return layers


def _key(name: str) -> str:
    return name.replace(".", "__")


class IdentityAdapter(nn.Module):
    def __init__(self, options: AdapterOptions, encoder_spec: EncoderSpec, layers: dict[str, tuple[int, int]],
                 base_hash: str, family: str = "sd1", mapper: nn.Module | None = None):
        super().__init__()
        self.options, self.encoder_spec, self.base_hash = options, encoder_spec, base_hash
        self.family = family
        """The base family it was made for (pipelines/families.py)."""
        self.trained_steps = 0
        """Optimiser steps this adapter has seen; 0 means untrained (identity not preserved)."""
        self.published: dict | None = None
        """For an adapter read from a published file (published.py): kind, variant, file hash, licence."""
        self.base_lora: dict = {}
        """A published adapter's LoRA of the base's attention layers, fused into the UNet at install."""
        self.image_encoder = None
        """FaceID-Plus: the CLIP image encoder its tokens read the face through (face/clip_image.py)."""
        self.identitynet = None
        """InstantID: its ControlNet, fed the tokens and the face's keypoints (identity/instantid.py)."""
        self.layers = dict(layers)
        cross_dim = next(iter(layers.values()))[1]
        if mapper is not None:  # a published layout's own mapper (published.py)
            self.mapper = mapper
        elif options.mapper == "multiref":
            self.mapper = MultiRefMapper(encoder_spec.dim, cross_dim, options.num_tokens)
        else:
            self.mapper = IdProjector(encoder_spec.dim, cross_dim, options.num_tokens, options.expression_dim,
                                      hidden=options.mapper_hidden or None)
        cls = PROCESSORS[options.method]
        self.processors = nn.ModuleDict({
            _key(name): cls(hidden, cross, options.gate, options.gate_threshold) for name, (hidden, cross) in layers.items()
        })
        for key, processor in self.processors.items():
            processor.bank_key = key

    @classmethod
    def for_unet(cls, unet, encoder_spec: EncoderSpec, options: AdapterOptions | None = None) -> "IdentityAdapter":
        """A new adapter for `unet`, identity projections initialised from the UNet's own."""
        from ray_faceid.pipelines.families import unet_family

        adapter = cls(options or AdapterOptions(), encoder_spec, cross_attention_layers(unet), base_unet_hash(unet),
                      unet_family(unet.config))
        modules = dict(unet.named_modules())
        for name in adapter.layers:
            adapter.processors[_key(name)].init_from(modules[name.rsplit(".", 1)[0]])
        return adapter

    @property
    def kind(self):
        """What this adapter reads of a person, the tokens it makes of it and which paths run it (kinds.py)."""
        from ray_faceid.identity.kinds import kind_of

        return kind_of(self)

    def tokens(self, embeddings: torch.Tensor, present: torch.Tensor | None = None,
               expression: torch.Tensor | None = None, drop_prob: float = 0.0,
               image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Identity tokens (B, T, C) from (B, D) embeddings (projector), (B, R, D) references (multiref),
        or (B, D) embeddings and (B, S, H) CLIP image features of the same faces (face_plus)."""
        if self.options.mapper == "face_plus":
            if image_features is None:
                raise BadInput("FaceID-Plus tokens read the face's CLIP image features as well as its embedding: "
                               "this path gives embeddings only (use `ray-faceid generate --image-encoder`)")
            return self.mapper(embeddings, image_features)
        if self.options.mapper == "instantid":
            return self.mapper(embeddings)
        if isinstance(self.mapper, MultiRefMapper):
            refs = embeddings if embeddings.ndim == 3 else embeddings.unsqueeze(1)
            return self.mapper(refs, present)
        return self.mapper(embeddings, expression, drop_prob)

    @staticmethod
    def check_file_family(uri: str, family: str) -> None:
        """Refuse an adapter (folder or published file) made for another family than `family`, before
        any base or worker loads."""
        from ray_faceid.identity import published

        if published.is_published_file(uri):
            made_for = published.family_of(uri)
            if made_for is None:
                return
            if made_for != family and {made_for, family} & {"sdxl"}:
                raise BaseModelMismatch(f"{uri} was made for an {made_for.upper()} base; the base is {family.upper()}: "
                                        "use the file made for this family")
            return
        IdentityAdapter.load(uri).check_family(family)

    def takes(self, spec: EncoderSpec) -> bool:
        """Whether embeddings of encoder `spec` fit this adapter: those of the encoder it was trained
        on; for a published adapter, any ArcFace of its width (its authors' encoder is named by no key
        of ours: which pack made an embedding is the operator's to keep the same)."""
        if self.published is not None:
            return spec.dim == self.encoder_spec.dim and not spec.name.startswith("dlib")
        return spec.key() == self.encoder_spec.key()

    def check_family(self, family: str) -> None:
        """Refuse a base of another family, by name (before anything loads, when a job starts)."""
        if {family, self.family} & {"sdxl"} and family != self.family:  # sd1 / sd2: the hash check names it
            raise BaseModelMismatch(f"this identity adapter was made for an {self.family.upper()} base; the base "
                                    f"loaded is {family.upper()}: use an adapter trained on this base's family")

    def check_base(self, unet) -> None:
        from ray_faceid.pipelines.families import unet_family

        self.check_family(unet_family(unet.config))
        if self.published is not None:  # made for a family, not for one set of weights: its layers were checked
            return
        got = base_unet_hash(unet)
        if got != self.base_hash:
            raise BaseModelMismatch(f"adapter was trained for the base UNet with weights hash {self.base_hash}; this "
                                    f"UNet's weights hash is {got}: load the base it was trained on, or train one for this base")

    def install(self, unet) -> None:
        """Put the identity processors into `unet` and freeze every base parameter."""
        self.check_base(unet)
        self.remove(unet)  # first: freezing the base must not freeze an adapter installed there before
        unet.requires_grad_(False)
        if self.base_lora:
            from ray_faceid.identity.published import fuse_lora

            fuse_lora(unet, self.base_lora, self.published["sha256"])
        procs = {}
        for name in unet.attn_processors:
            procs[name] = self.processors[_key(name)] if name in self.layers else SelfAttnProcessor()
        unet.set_attn_processor(procs)

    @staticmethod
    def remove(unet) -> None:
        """Back to the stock processors everywhere."""
        unet.set_attn_processor({name: SelfAttnProcessor() for name in unet.attn_processors})

    def config_dict(self) -> dict:
        return {
            "format": "ray_faceid.identity_adapter/1",
            "options": {k: v for k, v in self.options.model_dump().items() if _LATER_OPTIONS.get(k, object()) != v},
            "encoder": self.encoder_spec.model_dump(),
            "base_unet_hash": self.base_hash,
            "trained_steps": self.trained_steps,
            "layers": {k: list(v) for k, v in self.layers.items()},
            # Only SDXL's is written: adapters made before families existed keep their content hash.
            **({"family": self.family} if self.family == "sdxl" else {}),
            **({"published": self.published} if self.published else {}),
        }

    def content_hash(self) -> str:
        """Hash of the weights and config: a version id for caches and provenance. Weights are
        hashed as fp32 (numpy has no bf16); an adapter cast to half precision hashes as its
        rounded weights, which is what then runs."""
        config = self.config_dict()
        if self.published is not None:  # one file, whichever ArcFace pack's spec it was loaded beside (takes)
            config.pop("encoder")
        h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        for k, t in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, uri: str) -> None:
        state = {k: t.detach().cpu().contiguous() for k, t in self.state_dict().items()}
        storage.write_bytes(storage.join(uri, WEIGHTS_FILE), save_safetensors(state))
        storage.write_bytes(storage.join(uri, CONFIG_FILE), json.dumps(self.config_dict(), indent=2).encode())

    @classmethod
    def load(cls, uri: str, unet=None, encoder_spec: EncoderSpec | None = None,
             shortcut_scale: float | None = None) -> "IdentityAdapter":
        """Load an adapter (a folder `train` wrote, or a published file: published.py); with `unet` /
        `encoder_spec` given, refuse a mismatched base or encoder. `shortcut_scale`: FaceID-PlusV2's."""
        from ray_faceid.identity import published

        if published.is_published_file(uri):
            return published.load(uri, unet, encoder_spec, shortcut_scale)
        if shortcut_scale is not None:
            raise BadInput(f"{uri}: a shortcut scale (--plus-v2-scale) is for FaceID-PlusV2 files")
        try:
            config = json.loads(storage.read_bytes(storage.join(uri, CONFIG_FILE)))
        except NotFound as exc:
            raise NotFound(f"no identity adapter at {uri} (missing {CONFIG_FILE})") from exc
        saved_spec = EncoderSpec(**config["encoder"])
        if encoder_spec is not None and encoder_spec.key() != saved_spec.key():
            raise EncoderMismatch(
                f"adapter at {uri} was trained on {saved_spec.key()} embeddings ({saved_spec.dim}-d), "
                f"but the face encoder in use is {encoder_spec.key()} ({encoder_spec.dim}-d): "
                "use the same face encoder as the adapter, or train an adapter for this encoder"
            )
        adapter = cls(AdapterOptions(**config["options"]), saved_spec,
                      {k: tuple(v) for k, v in config["layers"].items()}, config["base_unet_hash"],
                      config.get("family", "sd1"))
        adapter.trained_steps = int(config.get("trained_steps", 0))
        if unet is not None:
            adapter.check_base(unet)
        adapter.load_state_dict(load_safetensors(storage.read_bytes(storage.join(uri, WEIGHTS_FILE))))
        return adapter


NO_ADAPTER = ("{model} is a real base and no identity adapter was given: pass --adapter (in a Serve config: "
              "adapter:) with a published IP-Adapter-FaceID file (README: 'Bring published weights') or a folder "
              "`ray-faceid train` wrote")


def shared_adapter(uri: str | None, base, encoder_spec: EncoderSpec | None,
                   shortcut_scale: float | None = None) -> "IdentityAdapter | None":
    """The adapter a job runs: the one `uri` names; with none, on the tiny smoke-test base a seeded
    untrained one (the same bytes every run), on a real base None: never a random adapter that
    makes another image each run. Callers refuse identity requests without one (NO_ADAPTER)."""
    if uri:
        return IdentityAdapter.load(uri, base.unet, encoder_spec, shortcut_scale)
    if shortcut_scale is not None:
        raise BadInput("a shortcut scale (--plus-v2-scale) is for FaceID-PlusV2 files: give one with --adapter")
    if not base.untrained:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return IdentityAdapter.for_unet(base.unet, encoder_spec)


"""Attribute flow (PluGeN4Faces cINF): an invertible flow over identity embeddings whose latent
splits into labelled attribute coordinates and an identity part.

RealNVP-style: affine coupling layers (scale through tanh for stability) between fixed random
permutations. Base distribution: the first k latent coordinates are Gaussian around the shot's
attribute labels (yaw, smile, ...); the rest is standard normal. Losses: flow NLL of the identity
part, pull of each shot's identity part towards the mean of its person's shots, and Gaussian NLL
of the attribute coordinates around their labels.

Editing = encode, set an attribute coordinate, decode; the identity part is untouched by
construction, and `edit` reports how far the embedding moved.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class AffineCoupling(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.half = dim // 2
        self.net = nn.Sequential(nn.Linear(self.half, hidden), nn.GELU(), nn.Linear(hidden, 2 * (dim - self.half)))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _params(self, a: torch.Tensor):
        s, t = self.net(a).chunk(2, dim=-1)
        return torch.tanh(s), t

    def forward(self, x: torch.Tensor):
        a, b = x[:, : self.half], x[:, self.half :]
        s, t = self._params(a)
        return torch.cat([a, b * torch.exp(s) + t], dim=-1), s.sum(-1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        a, b = y[:, : self.half], y[:, self.half :]
        s, t = self._params(a)
        return torch.cat([a, (b - t) * torch.exp(-s)], dim=-1)


class AttributeFlow(nn.Module):
    def __init__(self, dim: int, attributes: tuple[str, ...], couplings: int = 6, hidden: int = 256,
                 attribute_sigma: float = 0.1, seed: int = 0):
        super().__init__()
        self.dim, self.attributes, self.attribute_sigma = dim, tuple(attributes), attribute_sigma
        self.arch = {"dim": dim, "attributes": list(attributes), "couplings": couplings, "hidden": hidden,
                     "attribute_sigma": attribute_sigma, "seed": seed}
        self.layers = nn.ModuleList(AffineCoupling(dim, hidden) for _ in range(couplings))
        g = torch.Generator().manual_seed(seed)
        for i in range(couplings):
            self.register_buffer(f"perm{i}", torch.randperm(dim, generator=g))

    @property
    def k(self) -> int:
        return len(self.attributes)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, D) -> latent z (B, D), log|det dz/dx| (B,)."""
        logdet = torch.zeros(x.shape[0], device=x.device)
        for i, layer in enumerate(self.layers):
            x, ld = layer(x[:, getattr(self, f"perm{i}")])
            logdet = logdet + ld
        return x, logdet

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        for i in reversed(range(len(self.layers))):
            z = self.layers[i].inverse(z)
            z = z[:, torch.argsort(getattr(self, f"perm{i}"))]
        return z

    def losses(self, x: torch.Tensor, labels: torch.Tensor, person: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, D) embeddings, labels (B, k) attribute values, person (B,) integer ids of the shots' people."""
        z, logdet = self.encode(x)
        z_attr, z_id = z[:, : self.k], z[:, self.k :]
        nll = 0.5 * (z_id**2).sum(-1) + 0.5 * z_id.shape[1] * math.log(2 * math.pi) - logdet
        attr = 0.5 * (((z_attr - labels) / self.attribute_sigma) ** 2).sum(-1)
        people, index = torch.unique(person, return_inverse=True)
        sums = torch.zeros(len(people), z_id.shape[1], device=x.device).index_add(0, index, z_id)
        counts = torch.bincount(index, minlength=len(people)).clamp_min(1).unsqueeze(1)
        pull = ((z_id - (sums / counts)[index]) ** 2).sum(-1)
        out = {"nll": nll.mean() / self.dim, "attribute": attr.mean(), "pull": pull.mean()}
        out["total"] = out["nll"] + out["attribute"] + out["pull"]
        return out

    @torch.no_grad()
    def edit(self, x: torch.Tensor, changes: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Set attribute coordinates; returns the edited embeddings and how far each moved (L2)."""
        z, _ = self.encode(x)
        for name, value in changes.items():
            if name not in self.attributes:
                raise KeyError(f"attribute {name!r} not in this flow ({', '.join(self.attributes)})")
            z[:, self.attributes.index(name)] = value
        edited = self.decode(z)
        return edited, (edited - x).norm(dim=-1)


def save_flow(uri: str, flow: AttributeFlow, encoder: str, extra: dict | None = None) -> None:
    from ray_faceid.identity.module_files import save_module

    save_module(uri, flow, {"kind": "attribute_flow", **flow.arch, "encoder": encoder, **(extra or {})})


def load_flow(uri: str, encoder: str | None = None) -> AttributeFlow:
    """Load a trained flow; with `encoder` (an EncoderSpec key), refuse one trained on other embeddings."""
    from ray_faceid.errors import EncoderMismatch
    from ray_faceid.identity.module_files import load_module_files

    config, state, weights_hash = load_module_files(uri, "attribute_flow")
    if encoder is not None and config["encoder"] != encoder:
        raise EncoderMismatch(f"the flow at {uri} was trained on {config['encoder']} embeddings, not {encoder}: "
                              "train a flow on an ingest made with this encoder")
    flow = AttributeFlow(**{k: config[k] for k in ("dim", "attributes", "couplings", "hidden", "attribute_sigma", "seed")})
    flow.load_state_dict(state)
    flow.weights_hash, flow.encoder = weights_hash, config["encoder"]
    flow.held_out_people = config.get("held_out_people")  # None: trained on every person of its dataset
    return flow.eval()

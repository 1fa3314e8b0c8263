"""Tiny stand-ins of the published identity files, in their authors' key layouts, random weights:
IP-Adapter-FaceID (Plus, PlusV2, Portrait), InstantID's ip-adapter.bin and IdentityNet, XLabs' FLUX
IP-Adapter, PuLID-FLUX, and the CLIP image encoder folder they read photos through. The tests' parity checks
build them (against diffusers' own loaders); `ray-faceid stand-ins DIR` writes a set for the tiny
bases so every adapter path can be tried offline in one command each."""
from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import torch

TOY_EMBED = 16  # the tests' embedding width; the published files take 512-d ArcFace embeddings
CLIP_WIDTH, CLIP_INNER, CLIP_DEPTH = 24, 128, 4  # diffusers reads heads as to_q rows // 64 and builds 4 blocks


def _random(seed: int):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std
    return rand


def faceid_state_dict(unet, tokens: int = 4, hidden: int | None = None, rank: int = 4, seed: int = 0,
                      embed: int = TOY_EMBED) -> dict:
    """An IP-Adapter-FaceID checkpoint for `unet` (its projection, identity attention and the LoRA of
    every attention layer), taking `embed`-d embeddings."""
    rand = _random(seed)
    hidden = hidden or 2 * embed
    width = unet.config.cross_attention_dim
    proj = {"proj.0.weight": rand(hidden, embed, std=0.05), "proj.0.bias": rand(hidden),
            "proj.2.weight": rand(width * tokens, hidden), "proj.2.bias": rand(width * tokens),
            "norm.weight": 1 + rand(width), "norm.bias": rand(width)}
    modules = dict(unet.named_modules())
    ip = {}
    for i, name in enumerate(unet.attn_processors):
        attention = modules[name.removesuffix(".processor")]
        for projection, linear in (("to_q", attention.to_q), ("to_k", attention.to_k), ("to_v", attention.to_v),
                                   ("to_out", attention.to_out[0])):
            ip[f"{i}.{projection}_lora.down.weight"] = rand(rank, linear.in_features)
            ip[f"{i}.{projection}_lora.up.weight"] = rand(linear.out_features, rank)
        if name.endswith("attn2.processor"):
            ip[f"{i}.to_k_ip.weight"] = rand(attention.to_k.out_features, width)
            ip[f"{i}.to_v_ip.weight"] = rand(attention.to_v.out_features, width)
    return {"image_proj": proj, "ip_adapter": ip}


def faceid_plus_state_dict(unet, seed: int = 0, embed: int = TOY_EMBED) -> dict:
    """FaceID-Plus's checkpoint for `unet`: FaceID's projection and LoRA, and a perceiver resampler
    over CLIP_WIDTH-d image features."""
    state = faceid_state_dict(unet, seed=seed, embed=embed)
    rand = _random(seed + 1)
    width = unet.config.cross_attention_dim
    resampler = {"proj_in.weight": rand(width, CLIP_WIDTH), "proj_in.bias": rand(width),
                 "proj_out.weight": rand(width, width), "proj_out.bias": rand(width),
                 "norm_out.weight": 1 + rand(width), "norm_out.bias": rand(width)}
    for i in range(CLIP_DEPTH):
        resampler |= {f"layers.{i}.0.norm1.weight": 1 + rand(width), f"layers.{i}.0.norm1.bias": rand(width),
                      f"layers.{i}.0.norm2.weight": 1 + rand(width), f"layers.{i}.0.norm2.bias": rand(width),
                      f"layers.{i}.0.to_q.weight": rand(CLIP_INNER, width),
                      f"layers.{i}.0.to_kv.weight": rand(2 * CLIP_INNER, width),
                      f"layers.{i}.0.to_out.weight": rand(width, CLIP_INNER),
                      f"layers.{i}.1.0.weight": 1 + rand(width), f"layers.{i}.1.0.bias": rand(width),
                      f"layers.{i}.1.1.weight": rand(4 * width, width), f"layers.{i}.1.3.weight": rand(width, 4 * width)}
    state["image_proj"] |= {f"perceiver_resampler.{k}": v for k, v in resampler.items()}
    return state


def instantid_state_dict(unet, tokens: int = 4, hidden: int = 64, inner: int = 128, depth: int = 4, seed: int = 0,
                         embed: int = TOY_EMBED) -> dict:
    """InstantID's ip-adapter.bin for `unet`: a resampler over the raw embedding and identity attention."""
    rand = _random(seed)
    width = unet.config.cross_attention_dim
    proj = {"latents": rand(1, tokens, hidden, std=1.0), "proj_in.weight": rand(hidden, embed), "proj_in.bias": rand(hidden),
            "proj_out.weight": rand(width, hidden), "proj_out.bias": rand(width),
            "norm_out.weight": 1 + rand(width), "norm_out.bias": rand(width)}
    for i in range(depth):
        for norm in ("0.norm1", "0.norm2", "1.0"):
            proj[f"layers.{i}.{norm}.weight"], proj[f"layers.{i}.{norm}.bias"] = 1 + rand(hidden), rand(hidden)
        proj[f"layers.{i}.0.to_q.weight"] = rand(inner, hidden)
        proj[f"layers.{i}.0.to_kv.weight"] = rand(2 * inner, hidden)
        proj[f"layers.{i}.0.to_out.weight"] = rand(hidden, inner)
        proj[f"layers.{i}.1.1.weight"] = rand(4 * hidden, hidden)
        proj[f"layers.{i}.1.3.weight"] = rand(hidden, 4 * hidden)
    modules = dict(unet.named_modules())
    ip = {}
    for i, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            attention = modules[name.removesuffix(".processor")]
            ip[f"{i}.to_k_ip.weight"] = rand(attention.to_k.out_features, width)
            ip[f"{i}.to_v_ip.weight"] = rand(attention.to_v.out_features, width)
    return {"image_proj": proj, "ip_adapter": ip}


def save_identitynet(unet, folder, seed: int = 1, keypoint_weight: float = 0.05) -> str:
    """A ControlNet made from `unet` (as InstantID's IdentityNet was), its zero-initialised output
    convolutions given random weights so its residuals reach the image (`keypoint_weight`: the scale
    of those reading the keypoint image; larger, the pose shows at toy size)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16),  # the tiny VAE's factor 2
                                    load_weights_from_unet=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif name.startswith("controlnet_cond_embedding.conv_out"):
                p.copy_(torch.randn(p.shape, generator=g) * keypoint_weight)
    net.save_pretrained(folder)
    return str(folder)


def xlabs_state_dict(transformer, embed: int = TOY_EMBED, seed: int = 0) -> dict:
    """XLabs' FLUX IP-Adapter for `transformer`: its keys, flat, as saved with safetensors."""
    rand = _random(seed)
    config = transformer.config
    width, inner = config.joint_attention_dim, config.num_attention_heads * config.attention_head_dim
    state = {"ip_adapter_proj_model.proj.weight": rand(4 * width, embed, std=0.2),
             "ip_adapter_proj_model.proj.bias": rand(4 * width, std=0.2),
             "ip_adapter_proj_model.norm.weight": 1 + rand(width, std=0.2),
             "ip_adapter_proj_model.norm.bias": rand(width, std=0.2)}
    for i in range(len(transformer.transformer_blocks)):
        for part in "kv":
            state[f"double_blocks.{i}.processor.ip_adapter_double_stream_{part}_proj.weight"] = rand(inner, width, std=1.0)
            state[f"double_blocks.{i}.processor.ip_adapter_double_stream_{part}_proj.bias"] = rand(inner, std=0.2)
    return state


PULID_TOKENS, PULID_WIDTH = 4, 24  # the toy file's ID tokens (the published file: 32 of 2048)


def pulid_state_dict(transformer, seed: int = 0, id_input: int = 24, vit_width: int = 12) -> dict:
    """PuLID-FLUX's file for `transformer`: its IDFormer (toy widths: by default 16-d ArcFace + 8-d
    EVA-CLIP embeddings, 12-wide hidden states) and an ID cross-attention for every 2nd dual-stream and
    every 4th single-stream block, under their published names, flat as saved with safetensors."""
    from ray_faceid.identity.pulid_flux import (
        DOUBLE_INTERVAL,
        SINGLE_INTERVAL,
        IdCrossAttention,
        IdFormer,
    )

    torch.manual_seed(seed)
    former = IdFormer(dim=16, depth=5, inner=64, queries=PULID_TOKENS, id_tokens=2, id_input=id_input,
                      vit_width=vit_width, mapping_width=16, output_dim=PULID_WIDTH)
    with torch.no_grad():
        former.latents.normal_(0, 0.25)
        former.proj_out.normal_(0, 0.25)
    config = transformer.config
    count = (-(-len(transformer.transformer_blocks) // DOUBLE_INTERVAL)
             + -(-len(transformer.single_transformer_blocks) // SINGLE_INTERVAL))
    attentions = torch.nn.ModuleList(IdCrossAttention(config.num_attention_heads * config.attention_head_dim,
                                                      PULID_WIDTH, 128) for _ in range(count))
    with torch.no_grad():
        for attention in attentions:  # a residual as large as the stream's own: the toy's identity shows
            attention.to_out.weight.mul_(8)
    return {**{f"pulid_encoder.{k}": v.contiguous() for k, v in former.state_dict().items()},
            **{f"pulid_ca.{k}": v.contiguous() for k, v in attentions.state_dict().items()}}


def save_image_encoder(folder, projection_dim: int = TOY_EMBED) -> str:
    """A tiny CLIP vision model with projection, saved as h94/IP-Adapter's models/image_encoder is
    (config and weights only)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=CLIP_WIDTH, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                              image_size=224, patch_size=32, projection_dim=projection_dim)
    CLIPVisionModelWithProjection(config).eval().save_pretrained(folder)
    return str(folder)


def save(state: dict, path) -> str:
    """A checkpoint as its authors save it: a .bin of {part: {key: tensor}}, or flat prefixed keys in a
    .safetensors file."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({f"{part}.{k}": v.contiguous() for part, d in state.items() for k, v in d.items()}, str(path))
    else:
        torch.save(state, path)
    return str(path)


ARCFACE_DIM = 512  # what buffalo_l's and antelopev2's recognisers give


def save_arcface_onnx(path) -> str | None:
    """A tiny random ArcFace-shaped recogniser (N x 3 x 112 x 112 -> N x 512) as ONNX, so enrolled
    people can get the embeddings the stand-ins take (`identities embed --recognizer-onnx`); None
    without the onnx extra."""
    try:
        import onnx  # noqa: F401 - torch's exporter needs it
    except ImportError:
        return None
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, ARCFACE_DIM)).eval()
    torch.onnx.export(net, (torch.zeros(1, 3, 112, 112),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    return str(path)


def write_stand_ins(folder: str | Path) -> list[tuple[str, str]]:
    """Every published layout for the tiny bases under `folder`, with an embedding for each encoder
    they read (`ann_arcface.npy`: 512-d, unit length; `ann_clip.npy`: the tiny CLIP's image embedding).
    Returns (what, the generate arguments that use it) pairs."""
    from safetensors.torch import save_file

    from ray_faceid.pipelines.flux import build_tiny_flux
    from ray_faceid.pipelines.models import build_tiny

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    sd1, sdxl = build_tiny().unet, build_tiny(family="sdxl").unet
    rng = np.random.default_rng(0)
    arcface = rng.normal(size=(4, ARCFACE_DIM)).astype(np.float32)
    arcface /= np.linalg.norm(arcface, axis=1, keepdims=True)  # as buffalo_l's embeddings reach FaceID: unit length
    np.save(root / "ann_arcface.npy", arcface[:1])
    np.save(root / "ann_arcface_3_photos.npy", arcface[1:])
    np.save(root / "ann_clip.npy", rng.normal(size=(1, TOY_EMBED)).astype(np.float32))
    save_image_encoder(root / "image_encoder")
    save(faceid_state_dict(sd1, embed=ARCFACE_DIM), root / "ip-adapter-faceid_sd15.bin")
    save(faceid_state_dict(sdxl, embed=ARCFACE_DIM), root / "ip-adapter-faceid_sdxl.bin")
    save(faceid_plus_state_dict(sd1, embed=ARCFACE_DIM), root / "ip-adapter-faceid-plusv2_sd15.bin")
    save(faceid_state_dict(sd1, tokens=16, embed=ARCFACE_DIM), root / "ip-adapter-faceid-portrait_sd15.bin")
    (root / "InstantID").mkdir(exist_ok=True)
    save(instantid_state_dict(sdxl, embed=ARCFACE_DIM), root / "InstantID" / "ip-adapter.bin")
    save_identitynet(sdxl, root / "InstantID" / "ControlNetModel")
    (root / "flux-ip-adapter").mkdir(exist_ok=True)
    save_file(xlabs_state_dict(build_tiny_flux().transformer), str(root / "flux-ip-adapter" / "ip_adapter.safetensors"))
    save_file(pulid_state_dict(build_tiny_flux().transformer), str(root / "pulid_flux_v0.9.1.safetensors"))
    np.save(root / "ann_pulid_tokens.npy", rng.normal(size=(1, PULID_TOKENS, PULID_WIDTH)).astype(np.float32))
    save_arcface_onnx(root / "tiny_arcface_512.onnx")

    def path(*parts: str) -> str:  # quoted as a shell reads it: a folder may hold spaces or brackets
        return shlex.quote(str(root.joinpath(*parts)))

    arc, clip, encoder = path("ann_arcface.npy"), path("ann_clip.npy"), path("image_encoder")
    flux = path("flux-ip-adapter", "ip_adapter.safetensors")
    return [
        ("IP-Adapter-FaceID, SD 1.5", f"--model tiny --adapter {path('ip-adapter-faceid_sd15.bin')} --face-embedding {arc}"),
        ("IP-Adapter-FaceID, SDXL", f"--model tiny-sdxl --adapter {path('ip-adapter-faceid_sdxl.bin')} "
                                    f"--face-embedding {arc}"),
        ("IP-Adapter-FaceID-PlusV2 (a face photo read through CLIP too)",
         f"--model tiny --adapter {path('ip-adapter-faceid-plusv2_sd15.bin')} --image-encoder {encoder} "
         f"--face-embedding {arc} --ref PHOTO"),
        ("IP-Adapter-FaceID-Portrait (three photos' embeddings, each its own tokens)",
         f"--model tiny --adapter {path('ip-adapter-faceid-portrait_sd15.bin')} "
         f"--face-embedding {path('ann_arcface_3_photos.npy')}"),
        ("InstantID (IdentityNet; a frontal pose)",
         f"--model tiny-sdxl --adapter {path('InstantID', 'ip-adapter.bin')} "
         f"--identitynet {path('InstantID', 'ControlNetModel')} --face-embedding {arc}"),
        ("XLabs' FLUX IP-Adapter (the CLIP image embedding)", f"--model tiny-flux --adapter {flux} --face-embedding {clip}"),
        ("XLabs' FLUX IP-Adapter, a photo read through the CLIP image encoder",
         f"--model tiny-flux --adapter {flux} --image-encoder {encoder} --ref PHOTO"),
        ("PuLID-FLUX (the ID tokens of PuLID's own pipeline)",
         f"--model tiny-flux --adapter {path('pulid_flux_v0.9.1.safetensors')} "
         f"--face-embedding {path('ann_pulid_tokens.npy')}"),
    ]

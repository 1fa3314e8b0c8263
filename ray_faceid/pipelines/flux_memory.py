"""How a FLUX replica holds the model: FLUX.1-dev is 12B parameters in its transformer and 4.8B in
T5, 33 GB of GPU memory in bf16 before any activation. Two settings lower it:

- `text_encoders: cpu`: T5 and CLIP stay in the CPU's memory and encode each prompt there (seconds
  a prompt); their states move to the GPU for denoising.
- `transformer_weights: fp8`: the transformer's linear weights stored in float8 (e4m3) with a scale
  per output row, widened to the run's precision layer by layer as they are used: half of bf16's
  bytes; images differ slightly from bf16's (measured in tests/pipelines/test_flux_memory.py).
- `transformer_weights: fp8_matmul`: the same float8 weights, and each linear layer multiplies in
  float8 too (`torch._scaled_mm`; each token's activations scaled to float8 as they come): Hopper's
  float8 tensor cores run at twice bf16's rate, where fp8 alone only saves memory. Images differ from
  bf16's a little more than fp8's (the activations are rounded too; same test file).

The plan (bytes each component holds on the GPU) is read from a folder's safetensors headers, never
its weights, so a Serve config is checked when it is read (against `generator_gpu_memory_gb`), and a
replica checks it again against its own GPU's free memory before loading anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import isqrt, prod
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ray_faceid.errors import BadInput

TEXT_ENCODERS = ("same", "cpu")
TRANSFORMER_WEIGHTS = ("same", "fp8", "fp8_matmul")
FP8_STORED = ("fp8", "fp8_matmul")  # the settings that store the transformer's linear weights in float8
FLAGS = ("--flux-text-encoders", "--flux-transformer-weights")  # the two settings' names on the command line
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
FP8_MAX = 448.0  # the largest finite float8 e4m3 value
HEADROOM = 1.05  # the allocator's slack, above the weights and the estimated activations
# Live tensors of one block's call, in hidden widths a token: its attention's Q, K, V and output, the
# single-stream block's 4x MLP beside them, the residuals (counted on FLUX.1's blocks).
ACTIVATION_WIDTHS = 16
TEXT_TOKENS = 512  # FluxPipeline's T5 sequence, joint with the image's patches
GB = 1e9


class Float8Linear(nn.Module):
    """A Linear whose weight is stored in float8 (e4m3) with a scale per output row. `matmul` False:
    each call widens it to the input's dtype (a transient copy of one layer) and multiplies as the
    Linear did. True: each call scales every token's activations to float8 (its own scale, so one
    large token does not flatten the others) and multiplies the two in float8 with `torch._scaled_mm`,
    accumulating wider and returning bf16; a layer whose sides are not multiples of 16 (what the
    float8 kernels take) widens instead."""

    def __init__(self, linear: nn.Linear, matmul: bool = False):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.matmul = matmul and self.in_features % 16 == 0 and self.out_features % 16 == 0
        self.register_buffer("weight_fp8", (weight / scale).to(torch.float8_e4m3fn))
        # The float8 product takes its scales in float32, one per output column of the product.
        self.register_buffer("scale", scale.t().contiguous() if self.matmul else scale.to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul:
            return self._float8_product(x)
        weight = self.weight_fp8.to(x.dtype) * self.scale.to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def _float8_product(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        # Scaled in the input's own dtype (no float32 copy of the activations); the product is told the
        # scale as it was rounded there (never under the dtype's smallest normal: fp16 would round a
        # quiet token's to 0, and 0/0 is NaN), and the clamp keeps that rounding from passing float8's
        # largest (in place: one scaled copy of the input at a time).
        tiny = torch.finfo(rows.dtype).smallest_normal
        scale = (rows.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=tiny).to(rows.dtype)
        quantized = (rows / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        # The weight transposed is column-major, as the float8 kernels want their second operand.
        product = torch._scaled_mm(quantized, self.weight_fp8.t(), scale_a=scale.float(), scale_b=self.scale,
                                   out_dtype=torch.bfloat16, use_fast_accum=x.is_cuda).to(x.dtype)
        if self.bias is not None:
            product = product + self.bias.to(x.dtype)
        return product.reshape(*x.shape[:-1], self.out_features)


def check_fp8(device: torch.device, backend: str, transformer_weights: str = "fp8") -> None:
    """fp8 weights compiled on CUDA: Inductor reads them with Triton's float8 loads, which need compute
    capability 8.9 or more (Ada, Hopper); older GPUs fail in the middle of the warm-up without it.
    fp8_matmul: float8 products with a scale per row run on Hopper (9.0) and later, and on the CPU."""
    if transformer_weights == "fp8_matmul":
        _check_float8_products(device)
    if device.type == "cuda" and backend == "torch.compile":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise BadInput(f"fp8 transformer weights with torch.compile need a GPU of compute capability 8.9 or more "
                           f"(Ada, Hopper); {torch.cuda.get_device_name(device)} is sm_{major}{minor}: use backend "
                           "torch with fp8, or the precision's own weights")


def _check_float8_products(device: torch.device) -> None:
    """One float8 product scaled per row, as Float8Linear runs them, on `device`: which GPUs and
    torch versions run it changes between releases (Hopper and later with a recent torch; the CPU
    since torch 2.6 or so), so it is tried rather than looked up. Its failure is one line."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    try:
        layer = Float8Linear(nn.Linear(16, 16, bias=False), matmul=True).to(device)
        layer(torch.ones(2, 16, device=device, dtype=torch.bfloat16))
    except Exception as error:  # noqa: BLE001 - each torch release and device says it its own way
        said = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise BadInput(f"fp8_matmul transformer weights: float8 products scaled per row do not run on {where} with torch "
                       f"{torch.__version__} ({said}): use fp8 (float8 weights, products in the precision; Hopper GPUs "
                       "run fp8_matmul)") from None


def store_fp8(module: nn.Module, matmul: bool = False) -> int:
    """Every Linear of `module` (the transformer) replaced by a Float8Linear (`matmul`: multiplying in
    float8); how many."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Float8Linear(child, matmul))
                replaced += 1
    return replaced


@dataclass
class MemoryPlan:
    """Bytes each component holds, and where."""

    precision: str
    text_encoders: str
    transformer_weights: str
    components: dict[str, int] = field(default_factory=dict)
    hidden: int = 0
    """The transformer's hidden width (activations scale with it)."""
    widest_linear: int = 0
    """Elements of its largest linear weight: fp8 widens one such copy at a time."""
    widest_input: int = 0
    """The widest input of its linear layers: fp8_matmul scales and narrows one such input at a time."""
    activations: int = 0
    calls: str = ""

    @property
    def gpu_bytes(self) -> int:
        off = ("text_encoder", "text_encoder_2") if self.text_encoders == "cpu" else ()
        return sum(size for name, size in self.components.items() if name not in off)

    @property
    def needed_bytes(self) -> int:
        return int((self.gpu_bytes + self.activations) * HEADROOM)

    def for_calls(self, images: int, width: int, height: int, extra: dict[str, int] | None = None) -> "MemoryPlan":
        """This plan with what a replica runs beside the base: `extra` weights (an identity adapter, an
        image encoder) and the activations of its largest call, `images` images at width x height
        (estimated: the joint sequence x hidden width x ACTIVATION_WIDTHS)."""
        tokens = TEXT_TOKENS + (height // 16) * (width // 16)  # 8x VAE, 2x2 patches
        activations = images * tokens * self.hidden * BYTES[self.precision] * ACTIVATION_WIDTHS
        if self.transformer_weights == "fp8":  # one layer's weight widened at a time
            activations += self.widest_linear * BYTES[self.precision]
        elif self.transformer_weights == "fp8_matmul":  # one layer's input scaled (in place), then narrowed
            activations += images * tokens * self.widest_input * (BYTES[self.precision] + 1)
        return MemoryPlan(self.precision, self.text_encoders, self.transformer_weights,
                          {**self.components, **(extra or {})}, self.hidden, self.widest_linear, self.widest_input,
                          activations, f"{images} images at {width}x{height}")

    def line(self) -> str:
        where = {name: "cpu" if self.text_encoders == "cpu" and name.startswith("text_encoder") else "gpu"
                 for name in self.components}
        parts = ", ".join(f"{name} {gigabytes(size)} ({where[name]})" for name, size in self.components.items())
        weights = (f"{self.precision}, {self.transformer_weights.replace('_', ' ')} transformer weights"
                   if self.transformer_weights in FP8_STORED else self.precision)
        run = f"; activations of {self.calls} about {gigabytes(self.activations)}" if self.calls else ""
        return (f"FLUX in {weights}: {parts}{run}; {gigabytes(self.needed_bytes)} of GPU memory with "
                f"{round((HEADROOM - 1) * 100)} % slack")


def gigabytes(size: float) -> str:
    return f"{size / GB:.1f} GB" if size >= 0.1 * GB else f"{size / 1e6:.1f} MB"


def check_this_gpu(plan: MemoryPlan, where: str, share: float = 1.0, flags: bool = False) -> None:
    """check_fits against this GPU's free memory, or `share` of the whole card where less: replicas or
    actors placed on one GPU start together and each sees it all free."""
    free, total = torch.cuda.mem_get_info()
    check_fits(plan, min(free, int(total * min(1.0, share))), where, flags)


def check_settings(text_encoders: str, transformer_weights: str, device: torch.device, backend: str,
                   names: tuple[str, str] = ("text_encoders", "transformer_weights")) -> None:
    """The memory settings a run was given, checked before its model loads: each one line, naming
    them as the caller was given them (`names`: flags, config keys)."""
    if text_encoders not in TEXT_ENCODERS or transformer_weights not in TRANSFORMER_WEIGHTS:
        raise BadInput(f"{names[0]} is {' or '.join(TEXT_ENCODERS)} and {names[1]} "
                       f"{' or '.join(TRANSFORMER_WEIGHTS)}, not {text_encoders!r} / {transformer_weights!r}")
    if backend == "onnxruntime" and transformer_weights != "same":
        raise BadInput(f"{names[1]} {transformer_weights} is for backend torch or torch.compile: ONNX Runtime runs "
                       "FLUX's transformer graph in fp32")
    if transformer_weights in FP8_STORED:
        check_fp8(device, backend, transformer_weights)


def refuse_on_unet(text_encoders: str, transformer_weights: str, model: str) -> None:
    """--flux-text-encoders / --flux-transformer-weights given for a UNet base: one line naming each."""
    given = [f"--flux-text-encoders {text_encoders}"] if text_encoders != "same" else []
    given += [f"--flux-transformer-weights {transformer_weights}"] if transformer_weights != "same" else []
    if given:
        raise BadInput(f"{' and '.join(given)}: for FLUX bases; {model} is a UNet family")


def plan_from_shapes(shapes: dict[str, list[tuple[str, tuple[int, ...]]]], precision: str, text_encoders: str = "same",
                     transformer_weights: str = "same") -> MemoryPlan:
    """`shapes`: each component's (tensor name, shape) list."""
    if text_encoders not in TEXT_ENCODERS:
        raise BadInput(f"text_encoders must be one of {', '.join(TEXT_ENCODERS)}, not {text_encoders!r}")
    if transformer_weights not in TRANSFORMER_WEIGHTS:
        raise BadInput(f"transformer_weights must be one of {', '.join(TRANSFORMER_WEIGHTS)}, not "
                       f"{transformer_weights!r}")
    width = BYTES[precision]
    plan = MemoryPlan(precision, text_encoders, transformer_weights)
    for component, tensors in shapes.items():
        total = 0
        for name, shape in tensors:
            count = prod(shape)
            # fp8: a Linear's weight (2-d) is one byte an element, plus a scale per output row (fp8_matmul's
            # in float32).
            fp8 = transformer_weights in FP8_STORED and component == "transformer" and len(shape) == 2 and \
                name.endswith("weight")
            scale = 4 if transformer_weights == "fp8_matmul" else width
            total += count + shape[0] * scale if fp8 else count * width
            if component == "transformer" and len(shape) == 2:
                plan.widest_linear = max(plan.widest_linear, count)
                plan.widest_input = max(plan.widest_input, shape[1])
                if name.endswith("x_embedder.weight"):  # the patches' projection to the hidden width
                    plan.hidden = shape[0]
        plan.components[component] = total
    return plan


def plan_of_folder(folder: str | Path, precision: str, text_encoders: str = "same",
                   transformer_weights: str = "same") -> MemoryPlan:
    """The plan of a diffusers FLUX folder, from its safetensors headers (no weight is read)."""
    from safetensors import safe_open

    shapes = {}
    for component in COMPONENTS:
        files = sorted((Path(folder) / component).glob("*.safetensors"))
        if not files:
            raise BadInput(f"{folder}: no {component}/*.safetensors to size the replica's memory from")
        tensors = []
        for path in files:
            with safe_open(str(path), "pt") as opened:
                tensors += [(key, tuple(opened.get_slice(key).get_shape())) for key in opened.keys()]
        shapes[component] = tensors
    return plan_from_shapes(shapes, precision, text_encoders, transformer_weights)


def plan_of_base(base, precision: str, text_encoders: str = "same", transformer_weights: str = "same") -> MemoryPlan:
    """The plan of a loaded base (a tiny one has no files)."""
    shapes = {name: module_shapes(module) for name, module in base.modules.items()}
    return plan_from_shapes(shapes, precision, text_encoders, transformer_weights)


def module_shapes(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """The (name, shape) of each tensor a module saves, a tied one (T5's embeddings) once."""
    seen, shapes = set(), []
    for key, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            shapes.append((key, tuple(tensor.shape)))
    return shapes


def replica_plan(ref, precision: str, text_encoders: str, transformer_weights: str, images: int,
                 sizes: list[tuple[int, int]], adapter: str | None = None, image_encoder: str | None = None,
                 step_cache: bool = False, backend: str = "torch") -> MemoryPlan:
    """A Serve replica's plan: the base (a folder's headers; a tiny one built), its identity adapter and
    image encoder (their files' sizes), and the activations of its largest batch (`images` at the
    largest of `sizes`, else the native 1024 px, FLUX.1 Fill's pixel budget's square (1448 px); a tiny
    base's 32). `step_cache`: the two residuals
    a call keeps of each image (pipelines/flux_step_cache.py). `backend` onnxruntime: each loaded
    graph's session holds its own copy of the transformer (a graph per size, up to GRAPHS_KEPT, and
    one more a paused large job may still hold while small ones run at other sizes)."""
    if ref.kind == "tiny":
        from ray_faceid.pipelines.flux import load_flux

        plan = plan_of_base(load_flux(ref), precision, text_encoders, transformer_weights)
    else:
        plan = plan_of_folder(ref.local_folder(weights=True), precision, text_encoders, transformer_weights)
    side = 32 if ref.kind == "tiny" else 1024
    if ref.inpainting and not sizes:  # Fill repaints each photo at its own size, up to its pixel budget
        from ray_faceid.pipelines.flux_sampling import MAX_FILL_PIXELS

        side = isqrt(MAX_FILL_PIXELS)
    width, height = max(sizes, key=lambda wh: wh[0] * wh[1]) if sizes else (side, side)
    extra = {name: _local_bytes(path) for name, path in (("FLUX IP-Adapter", adapter),
                                                          ("image encoder", image_encoder)) if path}
    if adapter and extra["FLUX IP-Adapter"]:
        from ray_faceid.identity.flux_adapter import trained_encoder

        if trained_encoder(adapter) is not None:  # ours: a bank of people's own projections beside it
            extra["people's own adapters"] = _bank_bytes(extra["FLUX IP-Adapter"], precision)
    if backend == "onnxruntime":
        from ray_faceid.pipelines.flux_sampling import GRAPHS_KEPT

        sessions = min(max(len(sizes), 1), GRAPHS_KEPT) + (len(sizes) > 1)
        extra["ONNX Runtime's transformer graphs"] = sessions * plan.components["transformer"]
    if step_cache:
        extra["step cache"] = 2 * images * (height // 16) * (width // 16) * plan.hidden * BYTES[precision]
    return plan.for_calls(images, width, height, extra)


def _bank_bytes(file_bytes: int, precision: str) -> int:
    """The personal bank's stacks (identity/personal_bank.py) for an adapter saved in fp32: its slots
    plus the shared slot, each about the file's projections in the serving precision."""
    from ray_faceid.identity.personal_bank import BANK_BYTES, BANK_SLOTS

    per_person = file_bytes * BYTES[precision] // 4
    slots = max(1, min(BANK_SLOTS, BANK_BYTES // max(per_person, 1) - 1))
    return (slots + 1) * per_person


def _local_bytes(path: str) -> int:
    """A file's or a folder's weights' bytes on this machine (0 for a URI: counted on the replica)."""
    local = Path(path.removeprefix("file://"))
    if local.is_file():
        return local.stat().st_size
    if local.is_dir():
        for patterns in (("*.safetensors",), ("*.bin",), ("*.pt", "*.pth")):  # PuLID's encoders: .pt and .pth
            found = sum(p.stat().st_size for pattern in patterns for p in local.glob(pattern))
            if found:
                return found
    return 0


def check_fits(plan: MemoryPlan, free_bytes: int, where: str, flags: bool = False) -> None:
    """One line where the plan does not fit `free_bytes` (`where`: what holds them), naming what lowers it
    (`flags`: as the command line's options, else as a config's)."""
    if plan.needed_bytes <= free_bytes:
        return
    lower = [f"--{option.replace('_', '-')} {value}" if flags else f"{option}: {value}"
             for option, value, lowered in (("flux_text_encoders", "cpu", plan.text_encoders == "cpu"),
                                            ("flux_transformer_weights", "fp8", plan.transformer_weights in FP8_STORED))
             if not lowered]
    hint = f"set {' and '.join(lower)}" if lower else "use a GPU with more memory"
    raise BadInput(f"{plan.line()}: {where} has {gigabytes(free_bytes)}: {hint}")

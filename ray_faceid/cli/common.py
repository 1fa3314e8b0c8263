"""Helpers shared by sub-commands: typed errors become exit code 2 with their message."""
from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Iterator

import typer
from rich.console import Console

from ray_faceid.errors import FaceIdError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # one message, one line: logs are grepped

MODEL_HELP = ("Base model: tiny | tiny-inpaint | tiny-sdxl | tiny-sdxl-inpaint (untrained, for smoke runs) | a "
              "diffusers folder of SD 1.x, 2.x or SDXL (generate, inpaint, render, train, personalize, serve: FLUX.1 "
              "too; tiny-flux, tiny-flux-schnell, tiny-flux-fill) | an fsspec URI of one | "
              "a hub id.")
EXIT_BAD_INPUT = 2
EXIT_SOME_FAILED = 3  # a batch job finished, but some of its rows or identities have no result


StallWarnOpt = typer.Option(600.0, "--stall-warn", min=1, help="Seconds without progress before the job prints "
                           "what it is waiting for (resources, placement groups, pending tasks).")
StallFailOpt = typer.Option(3600.0, "--stall-fail", min=1, help="Seconds without progress before the job stops "
                           "with that report (exit 2) instead of waiting forever; a job none of whose workers can be "
                           "placed stops after 600 s, or this when shorter.")

ImageEncoderOpt = typer.Option(None, "--image-encoder", help="IP-Adapter-FaceID-Plus / PlusV2: the CLIP image encoder "
                               "folder it reads faces through (models/image_encoder of h94/IP-Adapter); a FLUX "
                               "IP-Adapter: the CLIP vision folder with projection it reads photos through; PuLID-FLUX: "
                               "a folder of EVA02_CLIP_L_336_psz14_s6B.pt (QuanSun/EVA-CLIP) and parsing_bisenet.pth "
                               "(facexlib), with --insightface-root (antelopev2).")
BACKEND_HELP = ("Denoiser runtime: auto | torch | torch.compile | onnxruntime | tensorrt (default torch: eager). auto: "
                "torch.compile on a GPU; on a CPU, ONNX Runtime for a UNet (where installed) and eager torch for FLUX. "
                "FLUX has no TensorRT engine yet.")


def _denoiser_backend(value: str) -> str:
    """--backend checked as it is parsed, whatever the model: a runtime's name, or one line."""
    from ray_faceid.engines.select import BACKENDS

    if value == "onnx":  # compile's name for the export, not a runtime
        raise typer.BadParameter("onnx is `ray-faceid compile`'s export; its graphs run on --backend onnxruntime")
    if value not in BACKENDS:
        raise typer.BadParameter(f"one of {', '.join(BACKENDS)}; not {value!r}")
    return value


BackendOpt = typer.Option("torch", "--backend", help=BACKEND_HELP, callback=_denoiser_backend)


def _one_of(*values: str):
    def check(value: str) -> str:
        if value not in values:
            raise typer.BadParameter(f"one of {', '.join(values)}; not {value!r}")
        return value
    return check


# How FLUX.1's 17B parameters fit a smaller GPU (pipelines/flux_memory.py), as a Serve config's
# flux_text_encoders / flux_transformer_weights say it for a replica.
FluxTextEncodersOpt = typer.Option("same", "--flux-text-encoders", callback=_one_of("same", "cpu"),
                                   help="FLUX: where T5 and CLIP encode the prompt: same (the transformer's device) or "
                                   "cpu (FLUX.1's 9.5 GB of text encoders off the GPU; seconds a prompt).")
FluxTransformerWeightsOpt = typer.Option(
    "same", "--flux-transformer-weights", callback=_one_of("same", "fp8", "fp8_matmul"),
    help="FLUX: same | fp8 (the transformer's linear weights in float8: FLUX.1-dev's 24 GB in 12; images differ "
    "slightly) | fp8_matmul (fp8, and its products in float8 too: faster on Hopper GPUs; images differ a little more).")
StepCacheOpt = typer.Option(0.0, "--step-cache", min=0.0, max=1.0, help="FLUX: reuse the transformer's other blocks "
                            "at steps where its first block changed less than this (first-block caching; 0: off; 0.1 is "
                            "a common start), on backend torch or torch.compile (not onnxruntime), not with --true-cfg. "
                            "Faster, a slightly different image: benchmarks/flux_generate.py measures how different.")
IdentityNetOpt = typer.Option(None, "--identitynet", help="InstantID: its IdentityNet folder (ControlNetModel/ of "
                              "InstantX/InstantID), with --adapter ip-adapter.bin.")
def _png_name(out):
    """An image's --out is a .png: its provenance rides in PNG text chunks (a .jpg name held PNG bytes)."""
    if out is not None and out.suffix.lower() != ".png":
        raise typer.BadParameter(f"{out}: images are written as PNG, their provenance in its text chunks: name it "
                                 f"{out.with_suffix('.png').name}")
    return out


PngOutOpt = typer.Option(..., "--out", callback=_png_name, help="Output PNG (with provenance metadata).")
IdentityNetScaleOpt = typer.Option(None, "--identitynet-scale", min=0.0, max=2.0, help="InstantID, with "
                                   "--identitynet: the weight of IdentityNet's residuals (default: the authors' 0.8).")


def identitynet_scale_of(identitynet: str | None, scale: float | None) -> float:
    """--identitynet-scale's value; given without --identitynet it would do nothing, so it is refused."""
    from ray_faceid.config import DEFAULT_IDENTITYNET_SCALE
    from ray_faceid.errors import BadInput

    if scale is not None and not identitynet:
        raise BadInput("--identitynet-scale weighs InstantID's IdentityNet: give --identitynet FOLDER too")
    return DEFAULT_IDENTITYNET_SCALE if scale is None else scale


def with_strengths(conditions: list, strengths: dict[str, float]) -> list:
    """Each IdentityCondition with its person's --strength (the others as they are)."""
    import dataclasses

    return [dataclasses.replace(c, scale=strengths.get(c.name, c.scale)) for c in conditions]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a FaceIdError into a one-line message and exit code 2, never a traceback."""
    from pydantic import ValidationError

    try:
        yield
    except FaceIdError as exc:
        report_error(exc)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    except ValidationError as exc:  # settings built from flags: name the flag and what it accepts
        reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        typer.echo(f"error (bad_input): {reasons}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc


def report_error(exc: FaceIdError, prefix: str = "error") -> None:
    """One unwrapped line on stderr (messages hold paths; no markup, no wrapping)."""
    typer.echo(f"{prefix} ({exc.code}): {exc.message}", err=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")

"""`ray-faceid merge-lora`: a base with LoRAs fused in (few-step LoRAs such as LCM, TCD, Hyper-SD or
SDXL-Lightning, and style LoRAs), saved as a model folder every command takes as --model."""
from __future__ import annotations

from typing import Optional

import typer

from ray_faceid.cli.common import MODEL_HELP, console, user_errors
from ray_faceid.cli.generate import SchedulerConfigOpt, SchedulerOpt
from ray_faceid.pipelines.schedulers import Sampler


def merge_lora(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    lora: list[str] = typer.Option(..., "--lora", help="A LoRA file (.safetensors as diffusers, PEFT or kohya save "
                                   "it; any fsspec URI), e.g. a few-step model's (LCM, TCD, Hyper-SD, "
                                   "SDXL-Lightning) or a style's; repeat for several."),
    lora_scale: list[float] = typer.Option([], "--lora-scale", help="Each LoRA's weight (default 1), or one for all."),
    scheduler: Optional[str] = SchedulerOpt,
    scheduler_config: list[str] = SchedulerConfigOpt,
    steps: Optional[int] = typer.Option(None, "--steps", min=1, max=200, help="The merged model's own steps: every "
                                        "command, catalog row and request that names none uses them (a few-step "
                                        "LoRA's authors say, e.g. 4); default: 30."),
    guidance: Optional[float] = typer.Option(None, "--guidance", min=0.0, max=30.0, help="Its own classifier-free "
                                             "guidance likewise (few-step models: 0-1); default: 5."),
    out: str = typer.Option(..., "--out", help="A new folder for the merged model (never overwritten)."),
):
    """Fuse LoRAs into a base and save it as a model folder, with the scheduler it samples with
    (a few-step LoRA's own: e.g. --scheduler lcm, or euler --scheduler-config timestep_spacing=trailing)."""
    from ray_faceid.pipelines.lora_merge import merge_loras
    from ray_faceid.pipelines.models import DEFAULT_GUIDANCE, TRAINED_STEPS

    with user_errors():
        sampler = Sampler.parse(scheduler, scheduler_config) if scheduler or scheduler_config else None
        record = merge_loras(model, lora, lora_scale, out, sampler, steps, guidance)
        loras = ", ".join(f"{m['file']} (sha256 {m['sha256'][:12]}, scale {m['scale']:g})" for m in record["loras"])
        own = record["sampling"]
        hint = "" if own else " (a few-step LoRA: merge with the --steps and --guidance its authors advise)"
        own = f"{own.get('steps', TRAINED_STEPS)} steps, guidance {own.get('guidance', DEFAULT_GUIDANCE):g}"
        console.print(f"merged {loras} into {model}; sampler {record['scheduler']}, {own}{hint}; saved to {out}: "
                      "pass it as --model")

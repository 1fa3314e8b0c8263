"""Samplers: the scheduler a base's folder ships by default, or one a caller names for a request.

A folder saved by diffusers says which scheduler its model was made to sample with (SD 1.5 ships
PNDM, SDXL Euler); a base runs with that one unless a request names another. A named scheduler is
built from the base's own scheduler config (its betas, training timesteps, prediction type) as
diffusers' `Scheduler.from_config(pipe.scheduler.config)` builds it, with the caller's overrides
(`timestep_spacing`, `use_karras_sigmas`, ...) on top. A request's scheduler is an input of that
request: the base's is never changed.
"""
from __future__ import annotations

import copy
import inspect
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ray_faceid.errors import BadInput, UnsupportedModel

# The names users know them by (the samplers' names in the web UIs of this field), with their settings.
SHORT_NAMES: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++2m-sde-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                           "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}


log = logging.getLogger(__name__)
# Not in a scheduler's config but an argument of its step: diffusers' pipelines pass eta=0.0.
STEP_DEFAULTS = {"eta": 0.0}
STEP_SETTINGS = frozenset(STEP_DEFAULTS)


def scheduler_class(name: str, where: str = "--scheduler"):
    """The diffusers scheduler class called `name` (a class name such as DPMSolverMultistepScheduler);
    schedulers of another sampling loop (flow matching) are refused."""
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    if name == "DPMSolverSDEScheduler":  # its noise comes from a Brownian tree of its own seed, not the image's
        raise BadInput(f"{where}: DPMSolverSDEScheduler draws its noise from a seed of its own (the same seed would "
                       "give another image each run); use dpm++2m-sde-karras")
    if not (inspect.isclass(cls) and issubclass(cls, SchedulerMixin)):
        raise BadInput(f"{where}: no scheduler {name!r}; use one of {', '.join(SHORT_NAMES)} or a diffusers "
                       "scheduler class name (e.g. DPMSolverMultistepScheduler)")
    if name.startswith("FlowMatch") or "num_train_timesteps" not in inspect.signature(cls.__init__).parameters:
        raise UnsupportedModel(f"{where}: {name} samples flow-matching models; SD 1.x / 2.x / SDXL bases take a "
                               f"diffusion scheduler: one of {', '.join(SHORT_NAMES)}")
    return cls


def parse_value(text: str):
    """A config value as typed on a command line: true/false, none, a number, else the text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


@dataclass(frozen=True)
class Sampler:
    """A request's scheduler: `name` None is the base's own; `overrides` change its config."""

    name: str | None = None
    overrides: tuple[tuple[str, object], ...] = ()

    @classmethod
    def parse(cls, name: str | None, options: list[str] | dict | None = None, where: str = "--scheduler") -> "Sampler":
        """From a command line or request: a short name or class name, and KEY=VALUE overrides
        (checked against the scheduler's config here, before any model loads); `where` names the
        field in messages."""
        if isinstance(options, dict):
            pairs = dict(options)
        else:
            pairs = {}
            for option in options or []:
                key, sep, value = option.partition("=")
                if not sep or not key.strip():
                    raise BadInput(f"--scheduler-config takes KEY=VALUE (e.g. timestep_spacing=trailing), got {option!r}")
                pairs[key.strip()] = parse_value(value)
        _check_values(pairs, "--scheduler-config" if where == "--scheduler" else f"{where}_config")
        name = name.strip() if name else None
        if name and name.lower() in SHORT_NAMES:  # one name per sampler in every image's provenance
            name = name.lower()
        sampler = cls(name or None, tuple(sorted(pairs.items())))
        if name:  # a named one is built once on its defaults: a bad value fails here, in one line
            kind = sampler.scheduler_type(where)
            sampler.check_keys(kind, "--scheduler-config" if where == "--scheduler" else f"{where}_config")
            with sampler.refusing_bad_settings(kind, trial=True):
                kind(**sampler.settings()).set_timesteps(10)  # where diffusers checks spacing and the like
        return sampler

    def settings(self) -> dict:
        """The config the name implies (dpm++2m-karras: Karras sigmas) and the overrides, on top."""
        short = SHORT_NAMES.get((self.name or "").lower())
        return {**(short[1] if short else {}), **{k: v for k, v in self.overrides if k not in STEP_SETTINGS}}

    @contextmanager
    def refusing_bad_settings(self, kind, trial: bool = False):
        """diffusers refuses a bad value with ValueError / TypeError / NotImplementedError (an unknown
        timestep_spacing, a word for a boolean, LCM over its 50 steps): one line naming the settings.
        `trial`: the scheduler built on its own to try the values (no model, no request running), where
        torch's own errors of an absurd value are the value's too."""
        refused = (ValueError, TypeError, NotImplementedError) + (
            (RuntimeError, IndexError, OverflowError, ZeroDivisionError) if trial else ())
        try:
            yield
        except refused as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
            given = ", ".join(f"{k}={v}" for k, v in self.overrides)
            raise BadInput(f"scheduler {kind.__name__}{f' with {given}' if given else ''}: {first}") from None

    def scheduler_type(self, where: str = "--scheduler"):
        """The named class (None: the base's own decides)."""
        if self.name is None:
            return None
        short = SHORT_NAMES.get(self.name.lower())
        return scheduler_class(short[0] if short else self.name, where)

    def check_keys(self, cls, where: str = "--scheduler-config") -> None:
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        known |= STEP_SETTINGS & set(inspect.signature(cls.step).parameters)
        unknown = sorted(k for k, _ in self.overrides if k not in known)
        if unknown:
            raise BadInput(f"{where}: {cls.__name__} has no setting {', '.join(unknown)}; it has "
                           f"{', '.join(sorted(known))}")

    def build(self, base_scheduler):
        """A fresh scheduler for one denoise (schedulers keep state between steps)."""
        if self.name is None and not self.overrides:
            return copy.deepcopy(base_scheduler)
        cls = self.scheduler_type() or type(base_scheduler)
        self.check_keys(cls)
        with self.refusing_bad_settings(cls):
            return cls.from_config(base_scheduler.config, **self.settings())

    def step_settings(self, scheduler) -> dict:
        """Arguments of each step, as diffusers' pipelines pass them: eta 0 unless asked (DDIM's
        noise, TCD's gamma), where the scheduler's step takes it."""
        takes = inspect.signature(scheduler.step).parameters
        asked = dict(self.overrides)
        return {k: asked.get(k, default) for k, default in STEP_DEFAULTS.items() if k in takes}

    def record(self, base_scheduler) -> dict:
        """What the provenance says: the scheduler's class and the settings asked for."""
        cls = self.scheduler_type() or type(base_scheduler)
        asked = {**self.settings(), **{k: v for k, v in self.overrides if k in STEP_SETTINGS}}
        return {"class": cls.__name__, "name": self.name or "the base's own", **({"config": asked} if asked else {})}


# A request's scheduler settings change how a trained model is sampled, not what it was trained on,
# and no setting of diffusers' schedulers is sensibly larger than this: a larger one only costs memory
# (num_train_timesteps sizes the scheduler's tables) or fails mid-denoise.
MODEL_SETTINGS = ("num_train_timesteps", "trained_betas")
MAX_SETTING = 10_000


def _check_values(pairs: dict, where: str) -> None:
    """Each override a finite number of at most MAX_SETTING in size (or a word, a flag), none of the
    model's own training settings, steps_offset 0 or 1 (diffusers' two conventions): one line each."""
    import math

    for key, value in pairs.items():
        if key in MODEL_SETTINGS:
            raise BadInput(f"{where}: {key} is the model's own (how it was trained), not a sampling setting; leave it "
                           "out")
        if isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        if not isinstance(value, (int, float)) or not math.isfinite(value) or abs(value) > MAX_SETTING:
            raise BadInput(f"{where}: {key}={str(value)[:40]} is not a setting a sampler takes (a word, a flag or a "
                           f"number of at most {MAX_SETTING} in size)")
        if key == "steps_offset" and value not in (0, 1):
            raise BadInput(f"{where}: steps_offset is 0 or 1 (diffusers' two conventions), not {value}")


def folder_scheduler(source: str):
    """The scheduler a diffusers folder ships (scheduler/scheduler_config.json's class); one this
    diffusers does not have samples with DDIM over the same config, and says so."""
    path = Path(source) / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedModel(f"{source}: no readable scheduler/scheduler_config.json ({type(exc).__name__}): "
                               "a diffusers model folder has one") from None
    name = config.get("_class_name", "DDIMScheduler")
    try:
        cls = scheduler_class(name, where=f"{source}/scheduler")
    except BadInput as exc:
        from diffusers import DDIMScheduler

        log.warning("%s; sampling with DDIM over its config (choose another with --scheduler)", exc.message)
        cls = DDIMScheduler
    with Sampler().refusing_bad_settings(cls):
        return cls.from_config(config)

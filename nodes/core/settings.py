"""AstriaPrompt -> the settings of a local only-upscale run: sampler, steps, seeds, size, weighting.

The rules are docs/astria-syntax.md section 7.

Every flag and param of the prompt lands in `applied` or in `not_applied` (with the reason), never silently
dropped. Pure: no ComfyUI, no random numbers (an unset seed takes the node's seed widget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import spec_tables as tables
from .names import shorten
from .syntax import AstriaPrompt, format_flag, format_param_line
from .user_errors import shown_as_pack

WEIGHTING_MODES = ("lpw", "a1111", "comfy", "none")
OFF = "off: nothing to do"
UNSET = "unset: nothing to do"
MAX_DENOISE_FOR_STEPS = 0.999  # A1111 img2img caps denoise here when counting steps, so 1.0 never starts past sigma 0


@shown_as_pack
class AstriaSettingsError(ValueError):
    """A prompt that parses but cannot run locally (e.g. `scheduler=tcd`), or node defaults out of range."""


@dataclass(frozen=True)
class SamplerDefaults:
    """The node's widgets and connections: used where the prompt leaves a setting unset."""

    steps: int = 16  # the only-upscale nodes' widget defaults (the docs' upscale example)
    cfg: float = 6.0
    denoise: float = 0.1  # the docs' upscale example; Astria's generic img2img 0.8 would repaint the picture
    sampler_name: str = "euler_ancestral"
    scheduler: str = "normal"
    seed: int = 0
    scale: float = 2.0
    has_upscale_model: bool = False
    has_control_net: bool = False
    weighting: str | None = None  # a node input that overrides use_lpw: "a1111", "comfy" or "none"


@dataclass(frozen=True)
class SettingNote:
    """One prompt item as written (`steps=16`, `--only_upscale`, `<faceid:1:1.0>`) and what became of it."""

    item: str
    detail: str


@dataclass(frozen=True)
class SamplerSettings:
    """Everything a local only-upscale run needs, plus the account of what was and was not applied."""

    steps: int
    denoise: float
    cfg: float
    sampler_name: str
    scheduler: str
    seed: int
    num_images: int
    seeds: tuple[int, ...]
    width: int | None
    height: int | None
    scale: float
    weighting: str
    control_strength: float | None
    start_step: int
    steps_to_run: int
    loras: tuple[tuple[str, float], ...]
    applied: tuple[SettingNote, ...]
    not_applied: tuple[SettingNote, ...]
    notices: tuple[str, ...]
    warnings: tuple[str, ...]
    from_node: tuple[str, ...] = ()
    """The settings the prompt leaves unset, so the node's widgets decide them (steps, denoise, cfg, sampler,
    seed, size): a preview without the node shows the widgets' defaults for these."""

    def target_size(self, input_width: int, input_height: int) -> tuple[int, int]:
        """The output size for an input: w and h as given; one of them: the other keeps the aspect; none: scale.

        Derived sides are rounded to the nearest pixel (at least 1), the same rule as img2img.target_size; padding
        to the model's grid is the pipeline's business.
        """
        if input_width <= 0 or input_height <= 0:
            raise AstriaSettingsError(f"the input image is {input_width}x{input_height}; it needs a positive size")
        if self.width and self.height:
            return self.width, self.height
        if self.width:
            return self.width, _round_px(input_height * self.width / input_width)
        if self.height:
            return _round_px(input_width * self.height / input_height), self.height
        return _round_px(input_width * self.scale), _round_px(input_height * self.scale)

    def summary_lines(self) -> list[str]:
        """Human-readable lines for the node's summary: settings, LoRAs, applied and not applied, notices."""
        lines = [
            f"Sampler: {self.sampler_name} / {self.scheduler}",
            (f"Steps: {self.steps} scheduled, {self.steps_to_run} run from step {self.start_step} at denoise "
             f"{_short(self.denoise)} (A1111 img2img)"),
            f"CFG: {_short(self.cfg)}",
            f"Images: {self.num_images}, seeds {', '.join(str(seed) for seed in self.seeds)}",
            "Size: " + (f"{self.width or 'auto'}x{self.height or 'auto'}" if self.width or self.height
                        else f"{_short(self.scale)}x the input"),
            f"Weighting: {self.weighting}",
        ]
        if self.control_strength is not None:
            lines.append(f"ControlNet strength: {_short(self.control_strength)}")
        if self.loras:
            lines.append("LoRAs: " + ", ".join(f"{name} ({_short(weight)})" for name, weight in self.loras))
        idle = [note.item for note in self.applied if note.detail in (OFF, UNSET)]
        lines += [f"Applied: {note.item}: {note.detail}" for note in self.applied if note.detail not in (OFF, UNSET)]
        if idle:
            lines.append("Off or unset, nothing to do: " + ", ".join(idle))
        if self.from_node:
            lines.append("Unset in the prompt, so from the node's widgets: " + ", ".join(self.from_node))
        lines += [f"Not applied: {note.item}: {note.detail}" for note in self.not_applied]
        lines += [f"Notice: {notice}" for notice in self.notices]
        lines += [f"Warning: {warning}" for warning in self.warnings]
        return lines


def img2img_steps(steps: int, denoise: float) -> tuple[int, int]:
    """A1111 img2img: (start index into the `steps` sigmas, model steps run); denoise 0 runs none.

    t_enc = int(min(denoise, 0.999) * steps); the run starts at sigma index steps - t_enc - 1 and takes t_enc + 1
    steps: 16 steps at 0.1 run 2, 20 at 0.5 run 11. (A1111 still runs one step at denoise 0; we return the input.)
    """
    if denoise <= 0:
        return steps, 0
    t_enc = int(min(denoise, MAX_DENOISE_FOR_STEPS) * steps)
    return steps - t_enc - 1, t_enc + 1


def sampler_settings(prompt: AstriaPrompt, defaults: SamplerDefaults) -> SamplerSettings:
    """Map a parsed prompt and the node's defaults to the settings of a local only-upscale run."""
    _check_defaults(defaults)
    notes = _Notes()
    steps = _steps(prompt, defaults, notes)
    denoise = _from_param(prompt, "denoising_strength", defaults.denoise, "denoise", notes)
    cfg = _from_param(prompt, "cfg_scale", defaults.cfg, "cfg", notes)
    sampler_name, scheduler = _sampler(prompt, defaults, notes)
    seed = _seed(prompt, defaults, notes)
    num_images = prompt.param("num_images", 1)
    seeds = tuple((seed + offset) % (tables.SEED_MAX + 1) for offset in range(num_images))
    if "num_images" in prompt.params:
        notes.applied(_item(prompt, "num_images"), f"{num_images} image(s) per input image, seeds {seeds[0]}, +1 ...")
    width, height = _size(prompt, defaults, notes)
    weighting = _weighting(prompt, defaults, notes)
    control_strength = _control(prompt, defaults, notes)
    _super_resolution(prompt, defaults, notes)
    _remaining_params(prompt, notes)
    _flags(prompt, notes)
    for name, weight in prompt.faceids:
        notes.not_applied(f"<faceid:{name}:{_short(weight)}>", tables.REMOTE_ONLY_REASON)
    if prompt.negative_prompt:
        notes.applied("negative_prompt", "the negative conditioning")
    start_step, steps_to_run = img2img_steps(steps, denoise)
    return SamplerSettings(
        steps=steps, denoise=denoise, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, seed=seed,
        num_images=num_images, seeds=seeds, width=width, height=height, scale=defaults.scale, weighting=weighting,
        control_strength=control_strength, start_step=start_step, steps_to_run=steps_to_run, loras=prompt.loras,
        applied=tuple(notes.applied_notes), not_applied=tuple(notes.not_applied_notes), notices=tuple(notes.notices),
        warnings=prompt.warnings, from_node=left_to_node(prompt),
    )


def left_to_node(prompt: AstriaPrompt) -> tuple[str, ...]:
    """Which of steps, denoise, cfg, sampler, seed and size the prompt leaves to the node's widgets."""
    unset = {
        "steps": not prompt.param("steps"),  # steps=0 is Astria's default: the node's steps
        "denoise": prompt.param("denoising_strength") is None,
        "cfg": prompt.param("cfg_scale") is None,
        "sampler": prompt.param("scheduler") is None,
        "seed": prompt.param("seed") is None,
        "size": prompt.param("w") is None and prompt.param("h") is None,
    }
    return tuple(name for name, is_unset in unset.items() if is_unset)


class _Notes:
    """Collects the applied / not applied account and notices."""

    def __init__(self):
        self.applied_notes: list[SettingNote] = []
        self.not_applied_notes: list[SettingNote] = []
        self.notices: list[str] = []

    def applied(self, item: str, detail: str) -> None:
        self.applied_notes.append(SettingNote(item, detail))

    def not_applied(self, item: str, detail: str) -> None:
        self.not_applied_notes.append(SettingNote(item, detail))


def _check_defaults(defaults: SamplerDefaults) -> None:
    """The node's widgets must themselves be valid settings (steps at least 1: 0 means 'use the default')."""
    problems = []
    if not 1 <= defaults.steps <= 10000:
        problems.append(f"steps {defaults.steps} (use 1 or more)")
    if not 0 <= defaults.denoise <= 1:
        problems.append(f"denoise {defaults.denoise} (use 0 to 1)")
    if not (math.isfinite(defaults.cfg) and defaults.cfg >= 0):
        problems.append(f"cfg {defaults.cfg} (use 0 or more)")
    if not 0 <= defaults.seed <= tables.SEED_MAX:
        problems.append(f"seed {defaults.seed} (use 0 to 2^32-1)")
    if not (math.isfinite(defaults.scale) and defaults.scale > 0):
        problems.append(f"scale {defaults.scale} (use more than 0)")
    if defaults.weighting is not None and defaults.weighting not in WEIGHTING_MODES:
        problems.append(f"weighting {defaults.weighting!r} (use one of {', '.join(WEIGHTING_MODES)})")
    if problems:
        raise AstriaSettingsError("the node's settings are out of range: " + "; ".join(problems))


def _item(prompt: AstriaPrompt, key: str) -> str:
    """A param as written in the canonical block, e.g. `steps=16`, `seed=`."""
    return format_param_line(key, prompt.params[key])


def _short(number: float) -> str:
    """A number for the summary: 16 not 16.0, 0.1 as is."""
    return str(int(number)) if float(number).is_integer() else repr(float(number))


def _steps(prompt: AstriaPrompt, defaults: SamplerDefaults, notes: _Notes) -> int:
    """`steps=0` (Astria's default) or unset: the node's steps widget, reported."""
    value = prompt.param("steps")
    if value:
        notes.applied(_item(prompt, "steps"), f"{value} steps scheduled")
        return value
    if "steps" in prompt.params:
        why = "Astria's default" if value == 0 else "unset"
        notes.applied(_item(prompt, "steps"), f"{why}: the node's {defaults.steps} steps")
    return defaults.steps


def _from_param(prompt: AstriaPrompt, key: str, default: float, what: str, notes: _Notes) -> float:
    """A float param, or the node's widget when unset."""
    value = prompt.param(key)
    if key in prompt.params:
        detail = f"{what} {_short(value)}" if value is not None else f"unset: the node's {what} {_short(default)}"
        notes.applied(_item(prompt, key), detail)
    return default if value is None else float(value)


def _sampler(prompt: AstriaPrompt, defaults: SamplerDefaults, notes: _Notes) -> tuple[str, str]:
    """Astria's scheduler name -> ComfyUI's (sampler_name, scheduler); `tcd` and unknown names are errors."""
    name = prompt.param("scheduler")
    if name is None:
        if "scheduler" in prompt.params:
            notes.applied("scheduler=", f"unset: the node's {defaults.sampler_name} / {defaults.scheduler}")
        return defaults.sampler_name, defaults.scheduler
    pair = tables.SCHEDULER_MAP.get(name.lower())
    if pair is None:
        known = ", ".join(tables.SCHEDULER_MAP)
        why = "has no local equivalent in ComfyUI" if name.lower() in tables.REMOTE_ONLY_SCHEDULERS else "is unknown"
        raise AstriaSettingsError(
            f"scheduler={shorten(name, 40)} {why}; use one of: {known} (or run this prompt with the remote node)"
        )
    notes.applied(f"scheduler={name}", f"sampler {pair[0]}, scheduler {pair[1]}")
    return pair


def _seed(prompt: AstriaPrompt, defaults: SamplerDefaults, notes: _Notes) -> int:
    """The prompt's seed, or the node's seed widget when unset (never a random number drawn here)."""
    value = prompt.param("seed")
    if value is not None:
        notes.applied(_item(prompt, "seed"), f"seed {value}")
        return value
    if "seed" in prompt.params:
        notes.applied("seed=", f"unset: the node's seed {defaults.seed}")
    return defaults.seed


def _size(prompt: AstriaPrompt, defaults: SamplerDefaults, notes: _Notes) -> tuple[int | None, int | None]:
    """`w`/`h` give the target size; unset: the node's scale of the input."""
    width, height = prompt.param("w"), prompt.param("h")
    for key, value in (("w", width), ("h", height)):
        if key in prompt.params:
            detail = f"target {'width' if key == 'w' else 'height'} {value}" if value is not None else (
                f"unset: {_short(defaults.scale)}x the input")
            notes.applied(_item(prompt, key), detail)
    return width, height


def weighting_from_prompt(prompt: AstriaPrompt) -> str:
    """The prompt's own weighting mode (docs/astria-syntax.md section 6): use_lpw true or unset -> lpw, false -> none.

    Astria's use_lpw ("use weighted prompts") runs diffusers' long-prompt-weighting pipelines, which `lpw`
    reproduces for SD1.x and SDXL; unset counts as true; false encodes brackets as text.
    """
    return "none" if prompt.param("use_lpw") is False else "lpw"


def _weighting(prompt: AstriaPrompt, defaults: SamplerDefaults, notes: _Notes) -> str:
    """The prompt's weighting mode, unless the node's input overrides it."""
    from_prompt = weighting_from_prompt(prompt)
    if defaults.weighting is not None:
        if "use_lpw" in prompt.params:
            notes.not_applied(_item(prompt, "use_lpw"), f"overridden by the node's weighting input ({defaults.weighting})")
        return defaults.weighting
    if "use_lpw" in prompt.params:
        notes.applied(_item(prompt, "use_lpw"), f"weighting {from_prompt}")
    return from_prompt


def _control(prompt: AstriaPrompt, defaults: SamplerDefaults, notes: _Notes) -> float | None:
    """Tile ControlNet strength (`--resemblance` wins over controlnet_conditioning_scale) and choice.

    Ours where the spec is silent: `--resemblance` is the upscale-specific knob, so it wins when both are given;
    the other is then listed as not applied.
    """
    resemblance = prompt.flag("resemblance")
    scale = prompt.param("controlnet_conditioning_scale")
    choice = prompt.param("controlnet")
    connected = defaults.has_control_net
    strength = None
    if resemblance is not None:
        if connected:
            notes.applied(format_flag("resemblance", resemblance), f"tile ControlNet strength {_short(resemblance)}")
            strength = float(resemblance)
        else:
            notes.not_applied(format_flag("resemblance", resemblance), tables.NO_CONTROL_NET_REASON)
    if "controlnet_conditioning_scale" in prompt.params:
        item = _item(prompt, "controlnet_conditioning_scale")
        if scale is None:
            notes.applied(item, UNSET)
        elif not connected:
            notes.not_applied(item, tables.NO_CONTROL_NET_REASON)
        elif strength is not None:
            notes.not_applied(item, "--resemblance gives the ControlNet strength")
        else:
            notes.applied(item, f"tile ControlNet strength {_short(scale)}")
            strength = float(scale)
    if "controlnet" in prompt.params:
        item = _item(prompt, "controlnet")
        if choice is None:
            notes.applied(item, UNSET)
        elif connected:
            notes.applied(item, f"the connected CONTROL_NET is used (Astria would pick {choice!r}; use a tile model)")
        else:
            notes.not_applied(item, tables.NO_CONTROL_NET_REASON)
    return strength


def _super_resolution(prompt: AstriaPrompt, defaults: SamplerDefaults, notes: _Notes) -> None:
    """A connected UPSCALE_MODEL always runs first (the graph is the user's explicit choice)."""
    if "super_resolution" not in prompt.params:
        return
    value = prompt.param("super_resolution")
    item = _item(prompt, "super_resolution")
    model = defaults.has_upscale_model
    if value is True and model:
        notes.applied(item, "the connected UPSCALE_MODEL runs first")
    elif value is True:
        notes.not_applied(item, "no UPSCALE_MODEL connected")
    elif value is False and model:
        notes.not_applied(item, "the connected UPSCALE_MODEL runs anyway (the graph is your explicit choice)")
    elif model:
        notes.applied(item, "unset; the connected UPSCALE_MODEL runs first")
    else:
        notes.applied(item, OFF if value is False else UNSET)


_HANDLED_PARAMS = frozenset({
    "num_images", "seed", "steps", "cfg_scale", "denoising_strength", "scheduler", "w", "h", "use_lpw",
    "super_resolution", "controlnet", "controlnet_conditioning_scale",
})


_PARAM_REASONS = ((tables.HIRES_PARAMS, tables.HIRES_REASON), (tables.URL_PARAMS, tables.URL_REASON),
                  (tables.ASPECT_PARAMS, tables.ASPECT_REASON))
_FLAG_REASONS = ((tables.HIRES_FLAGS, tables.HIRES_REASON),)


def _not_applied_reason(name: str, groups, known, unknown_reason: str) -> str:
    """Why a local run does not use a flag or param: its group's reason, else remote only; unknown names say so."""
    if name not in known:
        return unknown_reason
    return next((reason for names, reason in groups if name in names), tables.REMOTE_ONLY_REASON)


def _remaining_params(prompt: AstriaPrompt, notes: _Notes) -> None:
    """Params without a local meaning: not applied with the spec's reason, or 'nothing to do' when off/unset."""
    for key, value in prompt.params.items():
        if key in _HANDLED_PARAMS:
            continue
        item = _item(prompt, key)
        if key in tables.PARAM_TYPES and (value is None or value is False):
            notes.applied(item, OFF if value is False else UNSET)
        else:
            notes.not_applied(item, _not_applied_reason(key, _PARAM_REASONS, tables.PARAM_TYPES,
                                                        tables.UNKNOWN_PARAM_REASON))


def _flags(prompt: AstriaPrompt, notes: _Notes) -> None:
    """Flags: --only_upscale is expected; hires_* belong to --tiled_upscale; the rest run only remotely."""
    for name, value in prompt.flags.items():
        item = format_flag(name, value)
        if name == "only_upscale":
            notes.applied(item, "an only-upscale run, as this node does")
        elif name not in tables.CONTROL_NET_FLAGS:  # those are decided with the ControlNet items
            notes.not_applied(item, _not_applied_reason(name, _FLAG_REASONS, tables.FLAG_KINDS,
                                                        tables.UNKNOWN_FLAG_REASON))
    if not prompt.has_flag("only_upscale"):
        notes.notices.append("the prompt has no --only_upscale; this node runs it as an only-upscale anyway")


def _round_px(value: float) -> int:
    """The nearest whole pixel, at least 1."""
    return max(1, round(value))

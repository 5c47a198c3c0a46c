"""Astria LoRA Loader: apply the prompt's `<lora:NAME:W>` tags with the host's own LoRA machinery."""
import logging
import os
from collections import OrderedDict

import comfy.sd
import comfy.utils
import folder_paths

from ..core import loras as lora_core
from ..core.names import shorten
from ._api import io
from .types import AstriaPromptType, node_schema

log = logging.getLogger("astria")
ON_MISSING = ["error", "skip with a warning"]
LOADED_LORA_CACHE_SIZE = 8  # a handful of LoRAs per prompt; each is tens to hundreds of MB


def alias_file_path() -> str:
    """The default user's alias file (readable and writable by the frontend through ComfyUI's userdata API)."""
    return os.path.join(folder_paths.get_user_directory(), "default", lora_core.ALIAS_FILE_SUBPATH)


def load_aliases(create: bool = True) -> lora_core.AliasTable:
    """The user's LoRA aliases; the file is created with an explanatory `_comment` the first time it is needed."""
    path = alias_file_path()
    if not os.path.exists(path):
        if not create:
            return lora_core.AliasTable({}, path, {})
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(lora_core.default_alias_file_text())
    with open(path, encoding="utf-8-sig") as handle:
        return lora_core.parse_alias_file(handle.read(), path)


class _LoraFileCache:
    """LoRA state dicts by (path, mtime, size), so re-running a graph does not read the files again."""

    def __init__(self, size: int):
        self.size = size
        self.entries: OrderedDict = OrderedDict()

    def load(self, path: str) -> dict:
        """The safetensors state dict at path (safe_load: never unpickles)."""
        stat = os.stat(path)
        key = (path, stat.st_mtime_ns, stat.st_size)
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        state_dict = comfy.utils.load_torch_file(path, safe_load=True)
        self.entries[key] = state_dict
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return state_dict


LORA_FILES = _LoraFileCache(LOADED_LORA_CACHE_SIZE)


def apply_prompt_loras(model, clip, prompt, scale_model=1.0, scale_clip=1.0, on_missing="error"):
    """Apply every LoRA tag of the prompt to model and clip; returns (model, clip, report lines)."""
    if not prompt.loras:
        return model, clip, ["no <lora:...> tags in the prompt"]
    aliases = load_aliases()
    plan = lora_core.plan_loras(prompt.loras, folder_paths.get_filename_list("loras"), aliases, aliases.path)
    report = []
    for tag_name, error in plan.errors:
        if on_missing != "error" and isinstance(error, lora_core.LoraNotFoundError):
            log.warning("Astria LoRA %s skipped: %s", shorten(tag_name), error)
            report.append(f"SKIPPED {shorten(tag_name)}: {error}")
        else:
            error.args = (f"<lora:{shorten(tag_name)}>: {error}",)  # which tag; raised as it is, not wrapped
            raise error
    report += [f"warning: {warning}" for warning in plan.warnings]
    for planned in plan.loras:
        path = folder_paths.get_full_path_or_raise("loras", planned.filename)
        strength_model, strength_clip = planned.weight * scale_model, planned.weight * scale_clip
        if strength_model == 0 and strength_clip == 0:
            continue
        try:
            state_dict = LORA_FILES.load(path)
        except Exception as error:  # the file is named, with the loader's reason (its traceback adds nothing)
            raise lora_core.LoraResolutionError(f"LoRA file {planned.filename} could not be loaded: {error}") from None
        model, clip = comfy.sd.load_lora_for_models(model, clip, state_dict, strength_model, strength_clip)
    report = plan.report_lines() + report
    if scale_model != 1.0 or scale_clip != 1.0:
        report.append(f"all weights scaled: model x{scale_model:g}, text encoder x{scale_clip:g}")
    return model, clip, report


class AstriaLoraLoader(io.ComfyNode):
    """Applies every <lora:NAME:WEIGHT> tag of the Astria prompt to the model and CLIP, resolving Astria names
    through your aliases and ComfyUI's loras folders."""

    @classmethod
    def define_schema(cls):
        return node_schema(
            cls, "AstriaLoraLoader", "Astria LoRA Loader",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to apply the LoRAs to."),
                io.Clip.Input("clip", tooltip="The text encoder to apply the LoRAs to."),
                AstriaPromptType.Input("astria_prompt", tooltip="The parsed prompt from Astria Prompt."),
                io.Float.Input("strength_model_scale", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplies every tag's weight for the model (1.0 = as written)."),
                io.Float.Input("strength_clip_scale", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplies every tag's weight for the text encoder (1.0 = as written)."),
                io.Combo.Input("on_missing", options=ON_MISSING, default="error",
                               tooltip="A LoRA that is not found: stop with an error, or skip it with a warning."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with the prompt's LoRAs applied."),
                     io.Clip.Output(display_name="CLIP", tooltip="The text encoder with the prompt's LoRAs applied."),
                     io.String.Output(display_name="report",
                                      tooltip="Which file each tag loaded and how it was matched, the weights, and "
                                              "what was skipped, why.")],
        )

    @classmethod
    def execute(cls, model, clip, astria_prompt, strength_model_scale, strength_clip_scale,
                on_missing) -> io.NodeOutput:
        model, clip, report = apply_prompt_loras(model, clip, astria_prompt, strength_model_scale,
                                                 strength_clip_scale, on_missing)
        return io.NodeOutput(model, clip, "\n".join(report))


LORA_NODES = [AstriaLoraLoader]

"""The spec's tables (flag kinds, parameter types and ranges, scheduler map, local handling): one source of truth.

Nodes, the JS preview (through a route) and the docs read these; `as_json()` gives them as plain data.
The spec they implement: docs/astria-syntax.md (sections 3-5 the grammar's tables, section 7 the local run).
"""

from __future__ import annotations

# Astria's docs' upscale example (use-cases/upscale.md), every line as the page shows it: the one source of the
# example block; the nodes' default text and every test or bench variant is derived from it by docs_example().
DOCS_UPSCALE_BLOCK = """\
masterpiece, best quality, highres, <lora:more_details:0.5> <lora:SDXLrender_v2.0:1> --only_upscale
num_images=1
negative_prompt=(worst quality, low quality, normal quality:2) JuggernautNegative-neg
seed=
steps=16
cfg_scale=6.0
controlnet=
input_image_url=https://sdbooth2-production.s3.amazonaws.com/cvrx6g5wx5tbiuz9ivoah1j19why
mask_image_url=
denoising_strength=0.1
controlnet_conditioning_scale=
controlnet_txt2img=false
super_resolution=false
inpaint_faces=false
face_correct=false
film_grain=false
face_swap=false
hires_fix=false
backend_version=1
prompt_expansion=undefined
ar=1:1
scheduler=euler_a
color_grading=
use_lpw=false
w=
h=
"""
# The lines of the block a pasted prompt needs for the docs' result; the rest are Astria's unset or off defaults.
DOCS_EXAMPLE_KEYS = ("num_images", "negative_prompt", "seed", "steps", "cfg_scale", "denoising_strength", "scheduler",
                     "use_lpw")


def docs_example(*, verbatim: bool = False, text: str | None = None, **values: str | None) -> str:
    """The docs' upscale block: its DOCS_EXAMPLE_KEYS lines (or every line, `verbatim`), with line 1 replaced by
    `text` and each param in `values` set (None drops its line; a key the block lacks is added at the end)."""
    first, *params = DOCS_UPSCALE_BLOCK.rstrip("\n").split("\n")
    lines = [text if text is not None else first]
    for line in params:
        key = line.partition("=")[0]
        if key in values:
            value = values.pop(key)
            if value is not None:
                lines.append(f"{key}={value}")
        elif verbatim or key in DOCS_EXAMPLE_KEYS:
            lines.append(line)
    lines += [f"{key}={value}" for key, value in values.items() if value is not None]
    return "\n".join(lines)


# The nodes' default text and the example workflows' prompt.
DOCS_UPSCALE_EXAMPLE = docs_example()

# Flag kinds (docs/astria-syntax.md section 4).
BOOLEAN = "boolean"  # `--name` alone; text after it stays prompt text
ONE_VALUE = "value"  # `--name TOKEN`
WORDS = "words"  # `--name several words` up to the next flag or the end of the line

BOOLEAN_FLAGS = (
    "only_upscale",
    "tiled_upscale",
    "tiled_upscale_v2",
    "upscale_v4",
    "mask_invert",
    "video",
    "fix_bindi",
    "remove_background",
    "faceid_portrait",
)
ONE_VALUE_FLAGS = (
    "hires_cfg_scale",
    "resemblance",
    "hires_denoising_strength",
    "mask_dilate",
    "outpaint",
    "outpaint_width",
    "outpaint_height",
    "control_guidance_end",
    "improve_similarity",
    "video_model",
    "duration",
)
WORDS_FLAGS = (
    "mask_prompt",
    "mask_negative",
    "controlnets",
    "controlnet_weights",
    "outpaint_prompt",
    "video_prompt",
)

FLAG_KINDS: dict[str, str] = {
    **{name: BOOLEAN for name in BOOLEAN_FLAGS},
    **{name: ONE_VALUE for name in ONE_VALUE_FLAGS},
    **{name: WORDS for name in WORDS_FLAGS},
}
UNKNOWN_FLAG_KIND = WORDS  # the spec: any unknown flag takes several words

# Value types of one-value flags. The spec is silent; ours: the numeric ones are checked at parse time so a typo
# (`--resemblance O.65`) fails on its line instead of far away. `mask_dilate` takes `-20` or `-20%` (docs).
FLAG_VALUE_TYPES: dict[str, str] = {
    "hires_cfg_scale": "float",
    "resemblance": "float",
    "hires_denoising_strength": "float",
    "control_guidance_end": "float",
    "improve_similarity": "float",
    "outpaint_width": "int",
    "outpaint_height": "int",
    "duration": "int",
    "mask_dilate": "number_or_percent",
    "outpaint": "string",
    "video_model": "string",
}

# Tiled-upscale defaults named by Astria's docs (features/tiled-upscale.md). The resemblance default is also the
# only-upscale nodes' tile ControlNet strength.
DEFAULT_RESEMBLANCE = 0.65
FLAG_DEFAULTS: dict[str, float] = {"hires_cfg_scale": 5.5, "resemblance": DEFAULT_RESEMBLANCE}

# Parameter types (docs/astria-syntax.md section 5). Keys not listed are strings.
INT_PARAMS = ("num_images", "seed", "steps", "w", "h", "backend_version")
FLOAT_PARAMS = ("cfg_scale", "denoising_strength", "controlnet_conditioning_scale")
BOOL_PARAMS = (
    "controlnet_txt2img",
    "super_resolution",
    "inpaint_faces",
    "face_correct",
    "film_grain",
    "face_swap",
    "hires_fix",
    "use_lpw",
    "prompt_expansion",
)
STRING_PARAMS = (
    "negative_prompt",
    "scheduler",
    "ar",
    "aspect_ratio",
    "controlnet",
    "input_image_url",
    "mask_image_url",
    "color_grading",
    "style",
    "resolution",
    "tune_id",
    "theme",
)

PARAM_TYPES: dict[str, str] = {
    **{key: "int" for key in INT_PARAMS},
    **{key: "float" for key in FLOAT_PARAMS},
    **{key: "bool" for key in BOOL_PARAMS},
    **{key: "string" for key in STRING_PARAMS},
}
KNOWN_PARAMS = tuple(PARAM_TYPES)

SEED_MAX = 2**32 - 1

# Inclusive ranges; out of range is an error, never clamped.
PARAM_RANGES: dict[str, tuple[float, float]] = {
    "num_images": (1, 8),
    "steps": (0, 50),
    "cfg_scale": (0, 15),
    "denoising_strength": (0, 1),
    "seed": (0, SEED_MAX),
}
MULTIPLE_OF_8_PARAMS = ("w", "h")  # ours: also positive (a width of 0 or less is no size)

# Words that mean "unset" for any key (spec: empty and `undefined`).
UNSET_WORDS = ("", "undefined")

# Astria scheduler -> (ComfyUI sampler_name, ComfyUI scheduler). `tcd` has no local equivalent.
SCHEDULER_MAP: dict[str, tuple[str, str]] = {
    "euler": ("euler", "normal"),
    "euler_a": ("euler_ancestral", "normal"),
    "dpm++2m": ("dpmpp_2m", "normal"),
    "dpm++2m_karras": ("dpmpp_2m", "karras"),
    "dpm++sde": ("dpmpp_sde", "normal"),
    "dpm++sde_karras": ("dpmpp_sde", "karras"),
    "lcm": ("lcm", "sgm_uniform"),
}
REMOTE_ONLY_SCHEDULERS = ("tcd",)

# docs/astria-syntax.md section 7: what a local only-upscale run does with each item. "remote" items are sent as
# written by the remote node and reported locally; the settings module decides the connection-dependent ones
# (super_resolution, ControlNet items) at run time.
REMOTE_ONLY_REASON = "remote only: Astria runs it; the remote node sends it as written"
HIRES_REASON = "belongs to Astria's generate-then-upscale pipelines (--tiled_upscale), not to --only_upscale"
URL_REASON = "never fetched locally: the node's IMAGE input is the image (the remote node sends the URL)"
NO_CONTROL_NET_REASON = "no CONTROL_NET connected"
UNKNOWN_PARAM_REASON = "unknown parameter: the local nodes do not use it; the remote node sends it as written"
UNKNOWN_FLAG_REASON = "unknown flag: the local nodes do not use it; the remote node sends it as written"

REMOTE_ONLY_FLAGS = (
    "tiled_upscale",
    "tiled_upscale_v2",
    "upscale_v4",
    "mask_prompt",
    "mask_negative",
    "mask_invert",
    "mask_dilate",
    "outpaint",
    "outpaint_width",
    "outpaint_height",
    "outpaint_prompt",
    "video",
    "video_model",
    "video_prompt",
    "duration",
    "fix_bindi",
    "remove_background",
    "faceid_portrait",
    "improve_similarity",
    "control_guidance_end",
    "controlnets",
    "controlnet_weights",
)
HIRES_FLAGS = ("hires_cfg_scale", "hires_denoising_strength")
CONTROL_NET_FLAGS = ("resemblance",)

REMOTE_ONLY_PARAMS = (
    "face_correct",
    "face_swap",
    "inpaint_faces",
    "prompt_expansion",
    "film_grain",
    "color_grading",
    "style",
    "backend_version",
    "resolution",
    "theme",
    "tune_id",
    "controlnet_txt2img",
)
HIRES_PARAMS = ("hires_fix",)
CONTROL_NET_PARAMS = ("controlnet", "controlnet_conditioning_scale")
URL_PARAMS = ("input_image_url", "mask_image_url")
ASPECT_PARAMS = ("ar", "aspect_ratio")
ASPECT_REASON = "the input's aspect ratio is kept (set w and h for another size)"

# docs/astria-syntax.md section 7's table as rows, for docs and the JS preview.
LOCAL_ONLY_UPSCALE_TABLE: tuple[tuple[str, str], ...] = (
    ("denoising_strength", "denoise; unset: the node's widget (default 0.1)"),
    ("steps", "steps=0 or unset: the node's steps widget; A1111 img2img semantics: t_enc + 1 steps run"),
    ("scheduler", "sampler and scheduler via the scheduler map; tcd and unknown names are errors"),
    ("cfg_scale", "cfg; unset: the node's widget"),
    ("seed", "the seed; unset: the node's seed widget"),
    ("num_images", "that many images per input image, seeds seed, seed+1, ... (mod 2^32)"),
    ("negative_prompt", "the negative conditioning"),
    ("w, h", "target size (default: 2x the input)"),
    ("ar, aspect_ratio", ASPECT_REASON),
    ("super_resolution", "a connected UPSCALE_MODEL always runs first; true with none connected: not applied"),
    ("--resemblance, controlnet_conditioning_scale, controlnet",
     "tile ControlNet strength / choice when a CONTROL_NET is connected; otherwise not applied"),
    ("--hires_cfg_scale, --hires_denoising_strength, hires_fix", HIRES_REASON),
    ("--only_upscale", "expected; a prompt without it still runs, with a notice"),
    ("remote-only flags and params, <faceid:..>", REMOTE_ONLY_REASON),
    ("use_lpw", "weighting mode: true or unset -> a1111, false -> none"),
    ("input_image_url, mask_image_url", URL_REASON),
)


def as_json() -> dict:
    """Return every table as plain JSON-ready data (for the JS preview route and generated docs)."""
    return {
        "flag_kinds": dict(FLAG_KINDS),
        "unknown_flag_kind": UNKNOWN_FLAG_KIND,
        "flag_value_types": dict(FLAG_VALUE_TYPES),
        "flag_defaults": dict(FLAG_DEFAULTS),
        "param_types": dict(PARAM_TYPES),
        "param_ranges": {key: list(bounds) for key, bounds in PARAM_RANGES.items()},
        "multiple_of_8": list(MULTIPLE_OF_8_PARAMS),
        "unset_words": list(UNSET_WORDS),
        "scheduler_map": {name: list(pair) for name, pair in SCHEDULER_MAP.items()},
        "remote_only_schedulers": list(REMOTE_ONLY_SCHEDULERS),
        "remote_only_flags": list(REMOTE_ONLY_FLAGS),
        "remote_only_params": list(REMOTE_ONLY_PARAMS),
        "local_only_upscale": [list(row) for row in LOCAL_ONLY_UPSCALE_TABLE],
    }

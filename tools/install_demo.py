"""Prepare a ComfyUI that scripts/serve built itself for the example workflows: LoRA aliases and the example input.

Writes the aliases for the docs' LoRA names (`more_details`, `SDXLrender_v2.0` -> the demo LoRA) into
`<comfy>/user/default/astria/lora_aliases.json`, merged with what the user already has (their entries win), and
copies `workflows/astria_example_input.png` into `<comfy>/input/`. Never called for a user's COMFYUI_PATH tree.
Usage: python tools/install_demo.py --comfy DIR --models DIR
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_INPUT = PACK_ROOT / "workflows" / "astria_example_input.png"
DEMO_LORA = "tiny_sd15_demo_lora.safetensors"
EARLIER_DEMO_LORA = "tiny_sd15_lora.safetensors"  # what earlier versions of this script aliased the names to
DOCS_LORA_NAMES = ("more_details", "SDXLrender_v2.0")
ALIAS_SUBPATH = Path("user") / "default" / "astria" / "lora_aliases.json"
ALIAS_COMMENT = ("Astria LoRA name -> file in your loras folder. The demo maps the docs' names to the tiny demo "
                 "LoRA; point them at real files, or delete them.")


def merged_aliases(existing: dict, names=DOCS_LORA_NAMES, target=DEMO_LORA) -> dict:
    """The user's aliases plus the demo ones; an entry the user already has is never replaced (one this script wrote
    for the earlier demo LoRA is moved to the current one)."""
    merged = dict(existing)
    merged.setdefault("_comment", ALIAS_COMMENT)
    for name in names:
        if merged.get(name) == EARLIER_DEMO_LORA:
            merged[name] = target
        merged.setdefault(name, target)
    return merged


def read_aliases(path: Path) -> dict:
    """The alias file's object, {} when there is none; refuses (exits) on a file that is not a JSON object."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        sys.exit(f"error: {path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                 "fix or delete it, then run scripts/serve --demo-models again")
    if not isinstance(data, dict):
        sys.exit(f"error: {path} must hold a JSON object of name -> file; fix or delete it")
    return data


def install(comfy: Path, models: Path) -> list[str]:
    """Write the aliases and copy the example input; returns what was done, one line each."""
    done = []
    if not (models / "loras" / DEMO_LORA).is_file():
        done.append(f"warning: {models / 'loras' / DEMO_LORA} is missing; the aliases point at it anyway")
    alias_path = comfy / ALIAS_SUBPATH
    existing = read_aliases(alias_path)
    aliases = merged_aliases(existing)
    added = [name for name in DOCS_LORA_NAMES if existing.get(name) != aliases[name]]
    if aliases != existing:
        alias_path.parent.mkdir(parents=True, exist_ok=True)
        alias_path.write_text(json.dumps(aliases, indent=2) + "\n", encoding="utf-8")
    if added:
        done.append(f"LoRA aliases {', '.join(added)} -> {DEMO_LORA} added to {alias_path}")
    target = comfy / "input" / EXAMPLE_INPUT.name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(EXAMPLE_INPUT, target)
        done.append(f"example input image copied to {target}")
    return done


def main() -> None:
    """Parse the arguments and install."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfy", type=Path, required=True, help="the ComfyUI tree scripts/serve built")
    parser.add_argument("--models", type=Path, required=True, help="the generated demo models folder")
    args = parser.parse_args()
    if not (args.comfy / "main.py").is_file():
        sys.exit(f"error: {args.comfy} is not a ComfyUI tree (no main.py there)")
    for line in install(args.comfy, args.models):
        print(f"[astria] {line}", file=sys.stderr)


if __name__ == "__main__":
    main()

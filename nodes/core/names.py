"""The name-safety rule shared by the prompt parser and the LoRA resolver, and how names are quoted in messages.

A model name in a prompt must stay inside ComfyUI's model folders: no absolute path, drive letter, NUL or parent
component. The parser refuses such a name at parse time and the resolver refuses it again before touching a list.
"""

from __future__ import annotations

import re
import unicodedata

SHOWN_NAME_CHARS = 120
"""Names and values are quoted in messages up to this many characters: a pasted megabyte must not become a
megabyte of error."""
_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")


def unsafe_name_reason(name: str) -> str | None:
    """Why a name could leave the loras folder (or is empty), or None when it is a plain relative name."""
    if not name or not name.strip():
        return "it is empty"
    if "\0" in name:
        return "it contains a NUL character"
    if name[0] in "/\\":
        return "it starts with a slash, which makes it an absolute path"
    if _DRIVE_LETTER.match(name):
        return f"it starts with a drive letter ({name[:2]})"
    if any(is_parent_reference(part) for part in path_parts(unicodedata.normalize("NFKC", name))):
        return "it contains a '..' component, which points outside the loras folder"
    return None


def is_parent_reference(part: str) -> bool:
    """Whether a path component could mean the parent folder: `..`, or dots and spaces only with two dots or more.

    Windows drops trailing dots and spaces from names (`.. ` and `...` can act as `..`); the caller applies NFKC
    first, so fullwidth and leader dots (`．．`, `‥`) count too. No LoRA file is named that way, so refusing costs
    nothing.
    """
    dots = "".join(part.split())
    return len(dots) >= 2 and dots.count(".") == len(dots)


def shorten(text: str, limit: int = SHOWN_NAME_CHARS) -> str:
    """Text for a message, cut after `limit` characters with its length said: a pasted megabyte must not become a
    megabyte of error."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def path_parts(name: str) -> list[str]:
    """A relative name's components, with `\\` read as `/`."""
    return name.replace("\\", "/").split("/")

"""The errors the Astria client raises: each one's text is meant for the user, and names what to do."""

from __future__ import annotations

from typing import Optional

from .user_errors import shown_as_pack


@shown_as_pack
class AstriaError(Exception):
    """Base of every error the Astria client raises; its text is meant for the user."""


@shown_as_pack
class AstriaAuthError(AstriaError):
    """Astria answered 401: the API key is missing, wrong or revoked."""


@shown_as_pack
class AstriaRequestRejected(AstriaError):
    """Astria refused a request (422 validation or another 4xx): retrying the same request cannot help."""

    def __init__(self, message: str, status: int, server_text: str = ""):
        super().__init__(message)
        self.status = status
        self.server_text = server_text


@shown_as_pack
class AstriaNotFound(AstriaRequestRejected):
    """Astria does not know the prompt (or tune) asked for."""


@shown_as_pack
class AstriaPromptFailed(AstriaError):
    """Astria ran the prompt and reported a `user_error` for it."""

    def __init__(self, message: str, prompt_id: int, user_error: str):
        super().__init__(message)
        self.prompt_id = prompt_id
        self.user_error = user_error


@shown_as_pack
class AstriaTimeout(AstriaError):
    """A step ran past its deadline; the message names the step and the prompt id when there is one."""

    def __init__(self, message: str, step: str, prompt_id: Optional[int] = None):
        super().__init__(message)
        self.step = step
        self.prompt_id = prompt_id


@shown_as_pack
class AstriaCancelled(AstriaError):
    """The user cancelled; the message says whether a (billable) prompt already exists on Astria."""

    def __init__(self, prompt_id: Optional[int] = None, *, maybe_created: bool = False):
        if prompt_id is not None:
            text = (f"Cancelled. Prompt {prompt_id} was already created on Astria and may still be billed; running "
                    "the same image again resumes it instead of paying twice.")
        elif maybe_created:
            text = ("Cancelled while confirming a create whose answer was lost: a prompt may already exist on Astria "
                    "and may be billed; running the same image again looks it up before creating anything.")
        else:
            text = "Cancelled before anything was created on Astria: nothing was billed."
        super().__init__(text)
        self.prompt_id = prompt_id
        self.maybe_created = maybe_created


@shown_as_pack
class AstriaAmbiguousCreate(AstriaError):
    """A create failed in a way that may still have saved the prompt (5xx, timeout, dropped connection)."""


@shown_as_pack
class AstriaDuplicateRefused(AstriaError):
    """Astria kept answering creates with prompts that belong to other requests; nothing of ours was created."""


@shown_as_pack
class AstriaProtocolError(AstriaError):
    """Astria (or something in between) answered in a way the client cannot use, e.g. a redirect."""


@shown_as_pack
class AstriaDownloadError(AstriaError):
    """An image could not be downloaded or is not a usable image."""

"""Astria Remote Upscale: send each image of a batch with a pasted Astria prompt to Astria's API, get the results back.

Thin glue around nodes/core/astria_jobs.py (exactly-once creates, on astria_transport.py's HTTP and retries, with
the job journal of astria_journal.py). This file only says what to send (the prompt's text and params, one PNG per
image, one seed per image), where the key and the journal live, and how progress, Cancel and failures look inside
ComfyUI.
"""
import asyncio
import logging
from io import BytesIO
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
import numpy as np
import torch
from PIL import Image, ImageOps

from ..core import astria_transport, spec_tables
from ..core.astria_errors import AstriaCancelled
from ..core.astria_jobs import AstriaClient
from ..core.astria_journal import JobJournal
from ._api import io
from .types import AstriaPromptType, node_schema

log = logging.getLogger("astria")

DEFAULT_TUNE_ID = 690204  # Realistic Vision v5.1 from Astria's gallery, the tune of the docs' upscale example
SYSTEM_USER_NAME = "astria"  # folder_paths turns it into user/__astria/, which ComfyUI never serves over HTTP
KEY_FILE_NAME = "api_key"
JOURNAL_FILE_NAME = "jobs.jsonl"
PNG_COMPRESS_LEVEL = 4  # fast; the same pixels always give the same bytes, which the journal's job key relies on
# Params that are not `prompt[...]` form fields as they stand: the seed is sent per image, the tune is in the URL,
# and input_image_url only goes out when no IMAGE is connected (docs/astria-syntax.md section 8).
PARAMS_NOT_SENT = ("seed", "tune_id", "input_image_url")


def astria_folder() -> Path:
    """The pack's private folder, user/__astria/: the API key file and the job journal live there."""
    return Path(folder_paths.get_system_user_directory(SYSTEM_USER_NAME))


def load_key() -> tuple[str, Path]:
    """The API key (ASTRIA_API_KEY, else the key file) and the key file's path; a clear error when there is none."""
    key_file = astria_folder() / KEY_FILE_NAME
    key = astria_transport.load_api_key(key_file)
    if not key:
        raise ValueError(f"No Astria API key. Set the environment variable ASTRIA_API_KEY before starting ComfyUI, "
                         f"or save the key alone in {key_file} (then: chmod 600 {key_file}). The key is never a "
                         "node input, so it never lands in workflows or image metadata.")
    return key, key_file


def remote_fields(prompt, has_image: bool = True) -> tuple[dict, list[str]]:
    """The `prompt[...]` form fields for a parsed prompt (without the seed) and notices about what was changed;
    `has_image`: an IMAGE is connected (then it is uploaded and the prompt's input_image_url is not sent)."""
    notices = []
    # As pasted: Astria reads tags where they stand (`<faceid:ID:1> NAME` needs the class name right after the tag).
    text = prompt.text_as_written()
    if not prompt.has_flag("only_upscale"):
        text = f"{text} --only_upscale".strip()
        notices.append("The prompt had no --only_upscale; it was added, as this node only upscales.")
    fields = {"text": text}
    if prompt.negative_prompt:
        fields["negative_prompt"] = prompt.negative_prompt
    for key, value in prompt.params.items():
        if value is not None and key not in PARAMS_NOT_SENT:
            fields[key] = value
    if not has_image:
        fields["input_image_url"] = prompt.param("input_image_url")
    elif prompt.is_set("input_image_url"):
        notices.append("The prompt's input_image_url was not sent: the connected IMAGE is what Astria upscales.")
    return fields, notices


def batch_seeds(prompt, widget_seed: int, count: int) -> list[int]:
    """One seed per image: the prompt's seed= when set, else the widget's; image i gets seed + i (mod 2^32)."""
    base = prompt.param("seed", widget_seed)
    return [(int(base) + index) % astria_transport.SEED_MODULUS for index in range(count)]


def image_to_png(image: torch.Tensor) -> bytes:
    """One (H, W, C) image of 0..1 floats as PNG bytes (RGB, RGBA or greyscale by its channel count)."""
    pixels = (image.detach().cpu().float().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    channels = pixels.shape[-1]
    if channels == 1:
        picture = Image.fromarray(pixels[..., 0], mode="L")
    elif channels in (3, 4):
        picture = Image.fromarray(pixels, mode="RGB" if channels == 3 else "RGBA")
    else:
        raise ValueError(f"The image has {channels} channels; Astria Remote Upscale takes RGB or RGBA images.")
    buffer = BytesIO()
    picture.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def png_to_image(data: bytes) -> torch.Tensor:
    """Downloaded image bytes (already checked by the client) as an (H, W, 3) tensor of 0..1 floats."""
    with Image.open(BytesIO(data)) as picture:
        picture = ImageOps.exif_transpose(picture).convert("RGB")
        return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)


def stack_results(results) -> torch.Tensor:
    """All result images in input order as one IMAGE batch; different sizes are an error (a batch has one size)."""
    images = [(number, result.prompt_id, png_to_image(data)) for number, result in enumerate(results, start=1)
              for data in result.images]
    sizes = {tuple(image.shape[:2]) for _, _, image in images}
    if len(sizes) > 1:
        listed = ", ".join(f"image {number} (prompt {prompt_id}): {image.shape[1]}x{image.shape[0]}"
                           for number, prompt_id, image in images)
        raise ValueError(f"Astria returned images of different sizes ({listed}); a ComfyUI IMAGE batch holds one "
                         "size. They are paid and stay in your Astria gallery under those prompt ids; send images "
                         "that need different output sizes in separate runs.")
    return torch.stack([image for _, _, image in images])


class StatusReport:
    """ComfyUI's progress bar (images finished) and a status text with each image's latest stage."""

    def __init__(self, count: int, node_id):
        self.node_id = node_id
        self.lines = ["waiting"] * count
        self.finished = 0
        self.bar = comfy.utils.ProgressBar(count, node_id=node_id)

    def image_status(self, index: int, stage: str, text: str) -> None:
        """Record image `index`'s stage from the client and show the whole batch's status."""
        self.lines[index] = text
        if stage == "delivered":
            self.finished += 1
            self.bar.update_absolute(self.finished)
        self.show()

    def show(self) -> None:
        """Send the status text to the node in the browser (nothing without a running server)."""
        if self.node_id is None:
            return
        try:
            from server import PromptServer
        except ImportError:
            return
        instance = getattr(PromptServer, "instance", None)
        if instance is None:
            return
        header = f"Astria: {self.finished} of {len(self.lines)} image(s) done"
        lines = [f"image {number}: {text}" for number, text in enumerate(self.lines, start=1)]
        instance.send_progress_text("\n".join([header, *lines]), self.node_id)


async def send_batch(client, tune_id, fields, pngs, seeds, concurrency, status, poll_interval_s):
    """Run one job per image, at most `concurrency` at once; returns each image's JobResult or exception, in order."""
    limit = asyncio.Semaphore(concurrency)

    async def one(index):
        async with limit:
            return await client.run_job(tune_id, fields, pngs[index], seed=seeds[index], slot=index,
                                        poll_interval=poll_interval_s,
                                        on_status=lambda stage, text: status.image_status(index, stage, text),
                                        cancelled=comfy.model_management.processing_interrupted)

    return await asyncio.gather(*(one(index) for index in range(len(pngs))), return_exceptions=True)


def raise_for_failures(outcomes, first_seed: int) -> None:
    """Cancel becomes ComfyUI's interrupt; other failures one error naming every failed image and why."""
    cancels = [outcome for outcome in outcomes if isinstance(outcome, AstriaCancelled)]
    failures = [(number, outcome) for number, outcome in enumerate(outcomes, start=1)
                if isinstance(outcome, BaseException) and not isinstance(outcome, AstriaCancelled)]
    for number, outcome in failures:
        log.error("Astria Remote Upscale: image %d failed: %s", number, outcome)
    if cancels:
        for message in dict.fromkeys(str(cancel) for cancel in cancels):
            log.warning("Astria Remote Upscale: %s", message)
        comfy.model_management.throw_exception_if_processing_interrupted()  # also clears the interrupt flag
        raise comfy.model_management.InterruptProcessingException()
    if failures:
        done = len(outcomes) - len(failures)
        listed = "\n".join(f"- image {number}: {outcome}" for number, outcome in failures)
        raise RuntimeError(f"Astria Remote Upscale: {len(failures)} of {len(outcomes)} image(s) failed:\n{listed}\n"
                           f"The {done} finished image(s) are kept in the job journal: a run with the same seed "
                           f"({first_seed}) fetches them again without paying, and prompts still rendering on Astria "
                           "are resumed whatever the seed.")


class AstriaRemoteUpscale(io.ComfyNode):
    """Sends each image with the Astria prompt to Astria's API (--only_upscale) and returns the results. Every image
    is one paid Astria prompt, created exactly once. The API key comes from ASTRIA_API_KEY or the key file
    user/__astria/api_key, never from the workflow."""

    @classmethod
    def define_schema(cls):
        return node_schema(
            cls, "AstriaRemoteUpscale", "Astria Remote Upscale",
            inputs=[
                io.Image.Input("image", optional=True,
                               tooltip="The images to upscale; each image of the batch is one paid Astria prompt. "
                                       "Leave it unconnected to have Astria fetch the prompt's input_image_url= "
                                       "instead (one prompt)."),
                AstriaPromptType.Input("astria_prompt", tooltip="The parsed prompt from Astria Prompt; its text, "
                                                                "tags, flags and params are sent as written."),
                io.Int.Input("tune_id", default=DEFAULT_TUNE_ID, min=1, max=2**63 - 1,
                             tooltip="The Astria tune (model) that runs the prompt; 690204 is Realistic Vision "
                                     "v5.1 from Astria's gallery, as in Astria's upscale example."),
                io.Int.Input("seed", default=0, min=0, max=spec_tables.SEED_MAX, control_after_generate=True,
                             tooltip="Seed when the prompt's seed= is empty; image i of the batch gets seed + i. "
                                     "A new seed makes a new (paid) request; an unfinished job resumes whatever "
                                     "the seed says."),
                io.Int.Input("concurrency", default=2, min=1, max=8,
                             tooltip="How many images are sent to Astria at the same time."),
                io.Int.Input("max_prompts", default=16, min=1, max=10000,
                             tooltip="Spend guard: a batch with more images than this (one paid prompt each) "
                                     "does not start."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE",
                                     tooltip="Astria's results in input order: num_images per input image.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    async def execute(cls, astria_prompt, tune_id, seed, concurrency, max_prompts, image=None) -> io.NodeOutput:
        if image is None and not astria_prompt.is_set("input_image_url"):
            raise ValueError("Astria Remote Upscale has nothing to upscale: connect an IMAGE, or give the prompt an "
                             "input_image_url=https://... line for Astria to fetch.")
        count = 1 if image is None else image.shape[0]
        if count == 0:
            raise ValueError("Astria Remote Upscale: the image batch is empty; connect at least one image.")
        if count > max_prompts:
            raise ValueError(f"Astria Remote Upscale: this batch would create {count} paid Astria prompts (one per "
                             f"image, each returning num_images={astria_prompt.param('num_images', 1)} image(s)), "
                             f"more than max_prompts={max_prompts}. Raise max_prompts or send fewer images; nothing "
                             "was sent.")
        fields, notices = remote_fields(astria_prompt, has_image=image is not None)
        if astria_prompt.is_set("tune_id") and str(astria_prompt.param("tune_id")) != str(tune_id):
            notices.append(f"The prompt's tune_id={astria_prompt.param('tune_id')} was not used: the node's tune_id "
                           f"({tune_id}) is.")
        for notice in notices:
            log.warning("Astria Remote Upscale: %s", notice)
        key, key_file = load_key()
        waits = astria_transport.WaitSettings.from_env()
        seeds = batch_seeds(astria_prompt, seed, count)
        pngs = [None] if image is None else [image_to_png(image[index]) for index in range(count)]
        status = StatusReport(count, cls.hidden.unique_id if cls.hidden is not None else None)
        journal = JobJournal(astria_folder() / JOURNAL_FILE_NAME)
        async with AstriaClient(astria_transport.api_base_url(), key, journal=journal, key_file_hint=str(key_file),
                                retry=waits.retry) as client:
            outcomes = await send_batch(client, int(tune_id), fields, pngs, seeds, concurrency, status,
                                        waits.poll_interval_s)
        raise_for_failures(outcomes, seeds[0])
        for result in outcomes:
            for notice in result.notices:
                log.warning("Astria Remote Upscale: %s", notice)
        return io.NodeOutput(stack_results(outcomes))


REMOTE_NODES = [AstriaRemoteUpscale]

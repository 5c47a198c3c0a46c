"""Our exact one-pass tiled VAE on the host's VAE objects: which way it runs (activations in RAM, spilled to a file,
or the host's tiled VAE as the last resort) is planned from its memory model before anything is allocated."""
import logging
import os
import shutil
from dataclasses import dataclass

import comfy.model_management

from ..core import tiled_vae, tiling
from .host_runtime import gb, memory_budget, progress_bar, raise_if_interrupted, refuse_unless_fits, release_failed_try

log = logging.getLogger("astria")
BYTES_PER_PIXEL_HELD = 4 * 3 * 4
"""RGB float32 images an only-upscale holds at once at the output size: upscaled, decoded, colour-fixed, and one
transient copy (a clamp, the VAE's input scaling)."""
ACTIVATIONS_IN_RAM_BYTES = 5 * 2**28
"""Our exact path keeps full activations in RAM while its whole working memory takes at most this (1.25 GiB) and fits
the budget; above it they go to a spill file, so a run's RAM stays bounded by the tile at any size. At 256 px VAE
tiles a 1024 px encode (1.09 GiB) stays in RAM and a 1024 px decode (1.57 GiB in RAM, 0.82 GiB spilled) spills: at
512->1024 that decode was the only-upscale's peak, above UltimateSDUpscale's (docs/performance.md)."""
SPILL_DIR_ENV = "ASTRIA_SPILL_DIR"
"""Where spilled activations go (default: ComfyUI's temp folder; choose a disk, not a tmpfs, which is RAM); `off`
never spills (the host's tiled VAE, inexact, runs instead)."""
VRAM_SHARE_FOR_ACTIVATIONS = 0.5
"""On a GPU our exact path keeps each layer's full activation in GPU memory; it runs there only when its working
memory takes at most this share of the free GPU memory (tiles, other models and the host's own work need the
rest). Otherwise the host's tiled VAE runs: it holds only tiles. (Keeping GPU activations in RAM measured 70x the
untiled time on an H200 at 2048 px: see docs/performance.md.)"""
VAE_ATTENTION_CHOICES = ["exact", "local"]
"""The VAE attention widget: the exact global attention (default) or the opt-in local one (tiled_vae.py)."""
VAE_ATTENTION_TOOLTIP = ("exact: the VAE's attention sees the whole image (the untiled result). local: each 512 px "
                         "block sees only the 1024 px around it: not exact, but on a CPU faster above 2048 px "
                         "(that attention grows with the area squared: on 2 cores ~17 s per decode at 2048 px with "
                         "bfloat16 products, ~46 s per encode, which keeps float32, 1-3 hours at 8192 px). No effect "
                         "where ComfyUI's tiled VAE runs (already per tile).")
LOCAL_ATTENTION_NOTE = "attention local to 1024 px windows (vae_attention=local: not exact)"
HOST_TILED_RAM_PER_PIXEL = 3 * 4 * 3
"""The host's tiled VAE beside its tiles: its float32 output and blend-weight buffers and one converted copy."""


@dataclass(frozen=True)
class VAEPlan:
    """How one encode/decode runs, and why: `way` is "ram", "spill", "gpu" or "host" (the host's tiled VAE)."""
    way: str
    exact: bool
    ram: int
    reason: str

    def describe(self, what):
        """One line for the node summary and the log."""
        return f"VAE {what}: {self.reason}"


def spill_directory():
    """The folder spilled activations go to (ComfyUI's temp folder unless ASTRIA_SPILL_DIR says), or None when
    spilling is switched off or this OS cannot spill (`tiled_vae.SPILL_SUPPORTED`)."""
    folder = os.environ.get(SPILL_DIR_ENV, "").strip()
    if folder.lower() == "off" or not tiled_vae.SPILL_SUPPORTED:
        return None
    if folder:
        return folder
    import folder_paths

    temp = folder_paths.get_temp_directory()
    os.makedirs(temp, exist_ok=True)
    return temp


def spill_folder_in_ram(folder):
    """Whether `folder` is on a RAM filesystem (tmpfs, ramfs), where a spill file saves no memory (Linux's
    /proc/mounts; False where it cannot be read)."""
    try:
        with open("/proc/mounts") as handle:
            mounts = handle.read()
    except OSError:
        return False
    return tiled_vae.mount_type(os.path.realpath(folder), mounts) in tiled_vae.RAM_FILESYSTEMS


def _ours_supported(vae):
    """Whether our exact tiled path knows this VAE's shape (SD1.x/SDXL-style 2D image VAEs)."""
    if getattr(vae, "latent_dim", 2) != 2 or not hasattr(vae, "first_stage_model"):
        return False
    try:
        tiled_vae.check_vae(vae.first_stage_model)
        return True
    except tiled_vae.UnsupportedVAE as reason:
        log.info("Astria tiled VAE: this VAE's shape is not supported (%s); using ComfyUI's tiled VAE", reason)
        return False


def _host_tiled_ram(shape, encode, tile_size, vae):
    """RAM the host's tiled VAE takes: its output buffers beside one tile's own working memory."""
    pixels = shape[0] * shape[2] * shape[3] * (1 if encode else 64)
    tile = max(64, tile_size)
    memory_used = vae.memory_used_encode if encode else vae.memory_used_decode
    tile_shape = (1, shape[1], tile, tile) if encode else (1, shape[1], tile // 8, tile // 8)
    return pixels * HOST_TILED_RAM_PER_PIXEL + int(memory_used(tile_shape, vae.vae_dtype))


def plan(vae, shape, encode, tile_size, local_attention=False):
    """How our tiled VAE runs for input `shape` (B, C, H, W) with `tile_size`, from its memory model; raises our
    sentence when no way fits. With `local_attention` our way is not exact and says so (same memory)."""
    chosen = _plan(vae, shape, encode, tile_size, LOCAL_ATTENTION_NOTE if local_attention else "exact")
    if chosen.way == "host":
        return chosen
    reason = chosen.reason
    if chosen.way != "gpu" and tiled_vae.attention_dtype_for(vae.device, vae.vae_dtype, encode) != vae.vae_dtype:
        reason += (f"; attention products in bfloat16 ({tiled_vae.cpu_bf16_matmul_speedup():.1f}x float32's speed "
                   f"on this CPU; ~3e-3 more rounding; a layer whose probe finds it coarser runs float32)")
    return VAEPlan(chosen.way, chosen.exact and not local_attention, chosen.ram, reason)


def _plan(vae, shape, encode, tile_size, ours):
    """`plan`, with `ours` naming our way's exactness in its reasons."""
    what = "encode" if encode else "decode"
    if not _ours_supported(vae):
        return VAEPlan("host", False, _host_tiled_ram(shape, encode, tile_size, vae),
                       "ComfyUI's tiled VAE (inexact: this VAE's layers are not ones our exact tiling knows)")
    needs = tiled_vae.memory_needs(vae.first_stage_model, shape, encode, tile_size, vae.vae_dtype)
    if vae.device.type != "cpu":
        free = comfy.model_management.get_free_memory(vae.device)
        if needs.in_ram <= free * VRAM_SHARE_FOR_ACTIVATIONS:
            return VAEPlan("gpu", True, 0, f"{ours}, on the GPU ({gb(needs.in_ram)} of {gb(free)} free)")
        return VAEPlan("host", False, 0, f"ComfyUI's tiled VAE (inexact, up to ~0.2 off: the exact path would need "
                                         f"{gb(needs.in_ram)} of GPU memory, {gb(free)} is free)")
    budget = memory_budget()
    if needs.in_ram <= min(budget, needs.result + ACTIVATIONS_IN_RAM_BYTES):
        return VAEPlan("ram", True, needs.in_ram, f"{ours}, activations in RAM ({gb(needs.in_ram)})")
    folder = spill_directory()
    folder_in_ram = bool(folder) and spill_folder_in_ram(folder)
    in_ram_folder_note = (f"the spill folder {folder} is a RAM filesystem (tmpfs), so spilling there saves no "
                          f"memory: point {SPILL_DIR_ENV} at a folder on a disk")
    if folder_in_ram and needs.in_ram <= budget:
        return VAEPlan("ram", True, needs.in_ram, f"{ours}, activations in RAM ({gb(needs.in_ram)}; "
                                                  f"{in_ram_folder_note})")
    disk = shutil.disk_usage(folder).free if folder and os.path.isdir(folder) and not folder_in_ram else 0
    if folder and not folder_in_ram and needs.spilled_ram <= budget and needs.spill_file <= disk:
        return VAEPlan("spill", True, needs.spilled_ram,
                       f"{ours}, activations spilled to a temporary file in {folder} (up to {gb(needs.spill_file)}; "
                       f"in RAM they would take {gb(needs.in_ram)}, the in-RAM limit is "
                       f"{gb(min(budget, needs.result + ACTIVATIONS_IN_RAM_BYTES))}); RAM {gb(needs.spilled_ram)}")
    if not folder:
        why = "spilling is off" if tiled_vae.SPILL_SUPPORTED else "spill files need Linux, and this OS is not"
    elif folder_in_ram:
        why = in_ram_folder_note
    elif needs.spill_file > disk:
        why = f"the spill file would need {gb(needs.spill_file)} of disk and {gb(disk)} is free in {folder}"
    else:
        why = f"even spilled it needs {gb(needs.spilled_ram)} of RAM"
    host_ram = _host_tiled_ram(shape, encode, tile_size, vae)
    refuse_unless_fits(f"the tiled VAE {what} of a {shape[3] * (1 if encode else 8)}x"
                       f"{shape[2] * (1 if encode else 8)} px image (batch {shape[0]})", host_ram, budget,
                       "lower the scale, the batch size or tile_size, or free RAM")
    return VAEPlan("host", False, host_ram, f"ComfyUI's tiled VAE (inexact, up to ~0.2 off: {why})")


def check_fits_in_memory(width, height, batch, vae, tile_size, extra_stages=(), local_attention=False):
    """Refuse, before anything is allocated, an only-upscale whose images plus its largest stage's working memory
    (the tiled VAE encode and decode as they will run, and `extra_stages`: (name, bytes)) cannot fit the RAM
    budget, saying how much it needs and what to change. Returns the encode and decode plans as they look now
    (`encode` and `decode` plan again when they run: the RAM free then is what counts, the sampler's models come
    and go in between)."""
    images = width * height * batch * BYTES_PER_PIXEL_HELD
    budget = memory_budget()
    fix = "lower the scale or the batch size (or free RAM)"
    refuse_unless_fits(f"a {width}x{height} px result (batch {batch}) for its images alone", images, budget, fix)
    latent_h, latent_w = -(-height // 8), -(-width // 8)
    encode_plan = plan(vae, (batch, 3, latent_h * 8, latent_w * 8), True, tile_size, local_attention)
    decode_plan = plan(vae, (batch, 4, latent_h, latent_w), False, tile_size, local_attention)
    stages = [("the VAE encode", encode_plan.ram), ("the VAE decode", decode_plan.ram), *extra_stages]
    name, largest = max(stages, key=lambda stage: stage[1])
    refuse_unless_fits(f"a {width}x{height} px result (batch {batch}): {gb(images)} for its images plus "
                       f"{gb(largest)} for {name},", images + largest, budget, fix)
    return encode_plan, decode_plan


def park(image):
    """`image` copied into an unlinked spill file whose pages go back to the kernel (they are read back on use), so
    the decode that needs the RAM runs without it; `image` itself where no spill file can be made."""
    folder = spill_directory()
    if not folder or spill_folder_in_ram(folder):
        return image
    store = tiled_vae.SpillStore(folder)
    try:
        parked = store.empty(tuple(image.shape), image.dtype, channels_last=False)
    except OSError:  # a full disk: keep it in RAM (the memory check counted it there)
        return image
    parked.copy_(image)
    store.release()
    return parked


def _with_oom_retry(run_ours, run_host, tile_size, what):
    """Our exact path with tile_size; on a GPU out-of-memory error retry once with half the tile, and if that fails
    too, the host's tiled VAE at half the tile. Each step is said in the log."""
    smaller = max(64, tile_size // 2)
    try:
        return run_ours(tile_size)
    except comfy.model_management.OOM_EXCEPTION:
        pass  # retried below, outside the handler: the traceback holds the failed try's tensors until it ends
    log.warning("Astria tiled VAE %s ran out of GPU memory with %d px tiles; retrying with %d px tiles",
                what, tile_size, smaller)
    release_failed_try()
    try:
        return run_ours(smaller)
    except comfy.model_management.OOM_EXCEPTION:
        pass
    log.warning("Astria tiled VAE %s ran out of GPU memory again; using ComfyUI's tiled VAE with %d px tiles",
                what, smaller)
    release_failed_try()
    return run_host(smaller)


def _load(vae, shape, encode):
    """Load the VAE onto its device the host's way."""
    memory = (vae.memory_used_encode if encode else vae.memory_used_decode)(shape, vae.vae_dtype)
    comfy.model_management.load_models_gpu([vae.patcher], memory_required=min(memory, 2**30))


def _run_planned(vae_plan, what, notes, run_ours, run_host, tile_size):
    """Run the plan's way, saying it in the log and in `notes` (the node's summary lines)."""
    line = vae_plan.describe(what)
    log.info("Astria %s", line)
    if notes is not None:
        notes.append(line)
    if vae_plan.way == "host":
        return run_host(tile_size)
    if vae_plan.way != "spill":
        return _with_oom_retry(lambda tile: run_ours(tile, None), run_host, tile_size, what)
    try:
        return run_ours(tile_size, tiled_vae.SpillStore(spill_directory()))
    except OSError as error:  # the disk filled up (the store reserves each file's blocks as it makes it)
        reason = f"{error.strerror or error} while spilling to {spill_directory()}"
    release_failed_try()
    line = f"VAE {what}: ComfyUI's tiled VAE (inexact, up to ~0.2 off: {reason})"
    log.warning("Astria %s", line)
    if notes is not None:
        notes.append(line)
    return run_host(tile_size)


def encode(vae, pixels, tile_size, overlap=tiling.DEFAULT_OVERLAP, notes=None, local_attention=False):
    """Latent (B, C, H/8, W/8) of (B, H, W, C) pixels in 0..1: our exact one-pass tiled encode (its attention local
    with `local_attention`), or the host's; which way ran (and why) goes to the log and to `notes` when given."""
    pixels = pixels[..., :3]
    channels_first = pixels.movedim(-1, 1)
    vae_plan = plan(vae, channels_first.shape, True, tile_size, local_attention)

    def run_host(tile):
        return vae.encode_tiled(pixels, tile_x=tile, tile_y=tile, overlap=min(overlap, tile // 4))

    if vae_plan.way == "host":
        return _run_planned(vae_plan, "encode", notes, None, run_host, tile_size)
    vae.throw_exception_if_invalid()
    _load(vae, channels_first.shape, encode=True)
    model_input = vae.process_input(channels_first).to(vae.vae_dtype).to(vae.device)
    progress = progress_bar()

    def run_ours(tile, spill):
        return tiled_vae.tiled_encode(vae.first_stage_model, model_input, tile, device=vae.device,
                                      dtype=vae.vae_dtype, should_cancel=raise_if_interrupted, progress=progress,
                                      spill=spill, local_attention=local_attention)

    latent = _run_planned(vae_plan, "encode", notes, run_ours, run_host, tile_size)
    return latent.to(vae.output_device).float()


def _host_decode(vae, samples, tile_size, overlap):
    """The host's tiled decode with our pixel tile size and overlap (its arguments are in latent pixels)."""
    tile = max(8, tile_size // 8)
    return vae.decode_tiled(samples, tile_x=tile, tile_y=tile, overlap=min(overlap // 8, tile // 4))


def decode(vae, samples, tile_size, overlap=tiling.DEFAULT_OVERLAP, notes=None, local_attention=False):
    """(B, H, W, C) pixels in 0..1 of a latent tensor: our exact one-pass tiled decode (its attention local with
    `local_attention`), or the host's; which way ran (and why) goes to the log and to `notes` when given."""
    vae_plan = plan(vae, samples.shape, False, tile_size, local_attention)

    def run_host(tile):
        return _host_decode(vae, samples, tile, overlap)

    if vae_plan.way == "host":
        return _run_planned(vae_plan, "decode", notes, None, run_host, tile_size)
    vae.throw_exception_if_invalid()
    _load(vae, samples.shape, encode=False)
    latent = samples.to(vae.vae_dtype).to(vae.device)
    progress = progress_bar()

    def run_ours(tile, spill):
        decoded = tiled_vae.tiled_decode(vae.first_stage_model, latent, tile, device=vae.device,
                                         dtype=vae.vae_dtype, should_cancel=raise_if_interrupted, progress=progress,
                                         spill=spill, local_attention=local_attention)
        return vae.process_output(decoded.to(vae.output_device).float()).movedim(1, -1)

    return _run_planned(vae_plan, "decode", notes, run_ours, run_host, tile_size)

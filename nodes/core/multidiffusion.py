"""MultiDiffusion: denoise overlapping latent tiles in batches and blend them, at every sampler step.

`multidiffusion` is the core (a latent, a plan, a callable that denoises a batch of crops). `tiled_calc_cond_batch`
adapts it to ComfyUI's composable `calc_cond_batch` wrapper without importing ComfyUI: the wrapper's executor (the
next wrapper, and at the end the host's `_calc_cond_batch`) is passed in and called once per batch of tiles, with
every conditioning area, mask, spatial model cond (inpaint concat latents) and ControlNet hint cropped to those
tiles, so every wrapper installed after ours runs once per tile batch.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

from .cancel import check_cancel
from .tiling import LATENT_SCALE, Tile, TilePlan

Progress = Callable[[int, int], None]
"""progress(tiles_done, tiles_total), called after each tile."""


def tile_batches(plan: TilePlan, tile_batch_size: int) -> list[list[int]]:
    """Tile indices grouped into batches of at most `tile_batch_size` tiles of the same shape, in plan order."""
    if tile_batch_size < 1:
        raise ValueError(f"tile_batch_size must be at least 1, got {tile_batch_size}.")
    by_shape: dict[tuple[int, int], list[int]] = {}
    for index, tile in enumerate(plan.tiles):
        by_shape.setdefault((tile.height, tile.width), []).append(index)
    batches = []
    for indices in by_shape.values():
        batches.extend(indices[i:i + tile_batch_size] for i in range(0, len(indices), tile_batch_size))
    return batches


def _blend_batches(x: torch.Tensor, plan: TilePlan, run_batch, tile_batch_size: int, should_cancel, progress):
    """Shared loop: run_batch(crops, tiles) -> list of outputs (or None) shaped like crops; blend each output."""
    tiles = plan.tiles
    batch = x.shape[0]
    outputs: list[torch.Tensor | None] | None = None
    done = 0
    for indices in tile_batches(plan, tile_batch_size):
        check_cancel(should_cancel, "Tiled diffusion")
        chosen = [tiles[i] for i in indices]
        crops = torch.cat([x[(..., *t.slices())] for t in chosen])  # tile-major: tile 0's batch, tile 1's, ...
        results = run_batch(crops, chosen)
        if outputs is None:
            outputs = [None if r is None else torch.zeros(x.shape, dtype=torch.float32, device=x.device)
                       for r in results]
        for out, result in zip(outputs, results):
            if out is None:
                continue
            for k, (index, tile) in enumerate(zip(indices, chosen)):
                weight = plan.weight(index).to(x.device)
                part = result[k * batch:(k + 1) * batch].to(torch.float32)
                out[(..., *tile.slices())] += part * weight
        for _ in chosen:
            done += 1
            if progress is not None:
                progress(done, len(tiles))
    return [None if o is None else o.to(x.dtype) for o in outputs]


# ----------------------------------------------------------------------------------------------------------------
# Conditioning cropped to a batch of tiles (duck-typed on ComfyUI's cond dicts; no ComfyUI import)


def default_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of (N, C, h, w) to (height, width); the lead may pass the host's own resize instead."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    return torch.nn.functional.interpolate(image, size=(height, width), mode="bilinear", align_corners=False)


def _tile_major(parts: list[torch.Tensor], batch: int) -> torch.Tensor:
    """Concatenate per-tile crops after bringing each to `batch` rows the way ComfyUI repeats conds."""
    fitted = []
    for part in parts:
        if part.shape[0] > batch:
            part = part[:batch]
        elif part.shape[0] < batch:
            part = part.repeat((-(-batch // part.shape[0]),) + (1,) * (part.ndim - 1))[:batch]
        fitted.append(part)
    return torch.cat(fitted)


def crop_spatial(tensor: torch.Tensor, tiles: Sequence[Tile], batch: int, scale: int = 1) -> torch.Tensor:
    """Crop a (N, ..., H*scale, W*scale) tensor to each tile (given in latent units) and stack them tile-major."""
    return _tile_major([tensor[(..., *t.scaled(scale).slices())] for t in tiles], batch)


def crop_hint(hint: torch.Tensor, tiles: Sequence[Tile], batch: int, latent_size: tuple[int, int],
              scale: int = LATENT_SCALE, resize: Callable = default_resize) -> torch.Tensor:
    """A ControlNet hint (N, C, h, w) in pixel space, resized to the full image (latent x scale) as the host
    does, then cropped to each latent tile's pixel box and stacked tile-major."""
    if hint.shape[-1] == 1 and hint.shape[-2] == 1:
        return hint  # a 1x1 hint (e.g. an inpaint ControlNet's constant mask) broadcasts to any size
    full = resize(hint, latent_size[0] * scale, latent_size[1] * scale)
    return crop_spatial(full, tiles, batch, scale)


def crop_control(control, tiles: Sequence[Tile], batch: int, latent_size: tuple[int, int],
                 resize: Callable = default_resize):
    """A shallow copy of a ControlNet chain whose hints (and extra concat images) cover only the given tiles.

    Duck-typed on the host's ControlBase: `cond_hint_original`, `cond_hint`, `extra_concat_orig`,
    `compression_ratio`, `previous_controlnet`, and a T2I adapter's cached `control_input`.
    """
    if control is None:
        return None
    clone = copy.copy(control)
    scale = getattr(control, "compression_ratio", LATENT_SCALE)
    if getattr(control, "cond_hint_original", None) is not None:
        clone.cond_hint_original = crop_hint(control.cond_hint_original, tiles, batch, latent_size, scale, resize)
    if getattr(control, "extra_concat_orig", None):
        clone.extra_concat_orig = [crop_hint(c, tiles, batch, latent_size, scale, resize)
                                   for c in control.extra_concat_orig]
    for cached in ("cond_hint", "extra_concat", "control_input"):
        if hasattr(clone, cached):
            setattr(clone, cached, None)
    if getattr(control, "previous_controlnet", None) is not None:
        clone.previous_controlnet = crop_control(control.previous_controlnet, tiles, batch, latent_size, resize)
    return clone


def _crop_area(area, tile: Tile):
    """A cond's latent area [h, w, y, x] moved into the tile's frame, or None when they do not meet."""
    h, w, y, x = (int(v) for v in area)
    top, left = max(y, tile.y), max(x, tile.x)
    bottom, right = min(y + h, tile.y + tile.height), min(x + w, tile.x + tile.width)
    if bottom <= top or right <= left:
        return None
    return (bottom - top, right - left, top - tile.y, left - tile.x)


def crop_cond(cond: dict, tiles: Sequence[Tile], batch: int, latent_size: tuple[int, int],
              control_for: Callable | None = None) -> dict | None:
    """One ComfyUI cond dict for a batch of tiles: area, mask, spatial model conds and control cropped.

    Returns None when the cond's area misses the tile (then it does not apply there). An `area` can only
    follow one tile, so callers give area conds one tile per batch.
    """
    out = dict(cond)
    if "area" in cond:
        if len(tiles) != 1 or len(cond["area"]) != 4:
            raise ValueError("An area cond can only be cropped to one 2D tile at a time.")
        area = _crop_area(cond["area"], tiles[0])
        if area is None:
            return None
        out["area"] = area
    if cond.get("mask") is not None:
        out["mask"] = crop_spatial(cond["mask"], tiles, batch)
    model_conds = cond.get("model_conds")
    if model_conds:
        out["model_conds"] = {name: _crop_model_cond(value, tiles, batch, latent_size)
                              for name, value in model_conds.items()}
    if cond.get("control") is not None:
        out["control"] = (control_for or crop_control)(cond["control"], tiles, batch, latent_size)
    return out


def _crop_model_cond(value, tiles, batch, latent_size):
    """Crop a model cond whose tensor is latent-shaped (an inpaint model's concat latent and mask)."""
    tensor = getattr(value, "cond", None)
    if (isinstance(tensor, torch.Tensor) and tensor.ndim == 4 and tuple(tensor.shape[-2:]) == tuple(latent_size)
            and hasattr(value, "_copy_with")):
        return value._copy_with(crop_spatial(tensor, tiles, batch))
    return value


def _has_area(conds) -> bool:
    return any("area" in c for cond_list in conds if cond_list for c in cond_list)


class _ControlCache:
    """Cropped ControlNet copies per (control, tile batch), so each copy keeps its resized hint across steps."""

    def __init__(self, resize: Callable):
        self.resize = resize
        self.entries: dict[tuple, tuple[object, object]] = {}

    def get(self, control, tiles, batch, latent_size):
        key = (id(control), tuple(tiles), batch, tuple(latent_size))
        hit = self.entries.get(key)
        if hit is not None and hit[0] is control:  # holding `control` keeps its id from being reused
            return hit[1]
        clone = crop_control(control, tiles, batch, latent_size, self.resize)
        self.entries[key] = (control, clone)
        return clone

    def keep_only(self, controls) -> None:
        """Forget copies of controls that are no longer in use (a new sampling run)."""
        alive = {id(c) for c in controls}
        self.entries = {k: v for k, v in self.entries.items() if k[0] in alive}


def tiled_calc_cond_batch(args: dict, plan_for: Callable[[int, int], TilePlan], original_calc: Callable,
                          tile_batch_size: int = 4, should_cancel: Callable[[], bool] | None = None,
                          progress: Progress | None = None, resize: Callable = default_resize,
                          control_cache: _ControlCache | None = None) -> list[torch.Tensor]:
    """One `calc_cond_batch` call, MultiDiffusion style.

    `args` holds the call's conds, input, sigma, model and model_options; `original_calc(model, conds, x, sigma,
    model_options)` is the wrapper's executor (or any calc_cond_batch); `plan_for(latent_h, latent_w)` gives
    the plan. Returns one blended prediction per cond list, as calc_cond_batch does. A plan of one tile calls
    `original_calc` unchanged.
    """
    x, conds, sigma = args["input"], args["conds"], args["sigma"]
    model, model_options = args["model"], args["model_options"]
    latent_size = tuple(x.shape[-2:])
    plan = plan_for(*latent_size)
    if len(plan) == 1:
        return original_calc(model, conds, x, sigma, model_options)
    batch = x.shape[0]
    cache = control_cache or _ControlCache(resize)
    cache.keep_only([c["control"] for cl in conds if cl for c in cl if c.get("control") is not None])

    def control_for(control, tiles, batch_, size):
        return cache.get(control, tiles, batch_, size)

    def run_batch(crops: torch.Tensor, tiles: list[Tile]):
        tile_conds = []
        for cond_list in conds:
            if cond_list is None:
                tile_conds.append(None)
                continue
            cropped = [crop_cond(c, tiles, batch, latent_size, control_for) for c in cond_list]
            tile_conds.append([c for c in cropped if c is not None])
        tile_sigma = sigma.repeat(len(tiles)) if sigma.ndim == 1 and sigma.shape[0] == batch else sigma
        return original_calc(model, tile_conds, crops, tile_sigma, model_options)

    # an area differs per tile and ComfyUI applies one area to a whole batch, so area conds go one tile at a time
    size = 1 if _has_area(conds) else tile_batch_size
    return _blend_batches(x, plan, run_batch, size, should_cancel, progress)


def make_tiled_calc_cond_batch_wrapper(plan_for: Callable[[int, int], TilePlan], tile_batch_size: int = 4,
                                       should_cancel: Callable[[], bool] | None = None,
                                       progress: Progress | None = None, resize: Callable = default_resize):
    """A `calc_cond_batch` wrapper, `wrapper(executor, model, conds, x, sigma, model_options)`, that calls the
    executor once per tile batch and keeps its ControlNet crops across steps."""
    cache = _ControlCache(resize)

    def wrapper(executor, model, conds, x, sigma, model_options) -> list[torch.Tensor]:
        args = {"conds": conds, "input": x, "sigma": sigma, "model": model, "model_options": model_options}
        return tiled_calc_cond_batch(args, plan_for, executor, tile_batch_size, should_cancel, progress, resize, cache)

    return wrapper


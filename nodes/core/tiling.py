"""Tile plans: cover an area with evenly sized, overlapping tiles and blend weights that sum to exactly 1.

Callers speak pixels (`tile_size`, `overlap`, as in the host's tiled nodes); `latent_tile_plan` converts to latent
units (pixels / 8). Plans are pure data; `TilePlan.weight` builds a tile's float32 blend weight on demand.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_TILE_SIZE = 1024
"""Pixels. SDXL's native size and twice SD1.5's: big enough that 1024 px runs untiled and 2048/4096 px stay
under 1.15x UNet work with a 64 px overlap (see bench/vae_tiling.py --amplification)."""
DEFAULT_OVERLAP = 64
"""Pixels (8 latent px): MultiDiffusion blends at every step, so a narrow overlap is enough to hide seams."""
LATENT_SCALE = 8
"""Pixels per latent pixel for SD1.x/SDXL VAEs."""
LATENT_ALIGN = 8
"""Tile sides in latent px are multiples of this, so the SD UNet's three 2x downsamples divide them exactly."""

# Ramp values are multiples of 1/4096, so a product of two (y and x) is a multiple of 2**-24: exact in float32,
# and the sums of up to four such products (every point lies in at most 2x2 tiles) are exactly 1.0.
_WEIGHT_STEPS = 4096


@dataclass(frozen=True)
class Tile:
    """One tile of a plan: top-left corner and size, in the plan's units."""

    y: int
    x: int
    height: int
    width: int

    @property
    def area(self) -> int:
        """Number of cells the tile covers."""
        return self.height * self.width

    def slices(self) -> tuple[slice, slice]:
        """(rows, columns) slices that select this tile from a (..., H, W) tensor."""
        return slice(self.y, self.y + self.height), slice(self.x, self.x + self.width)

    def scaled(self, factor: int) -> Tile:
        """The same tile in units `factor` times finer (latent tile -> pixel tile with factor 8)."""
        return Tile(self.y * factor, self.x * factor, self.height * factor, self.width * factor)


@dataclass(frozen=True)
class AxisPlan:
    """Tiles along one axis: starts, sizes, and each tile's 1D weight as integer steps of 1/4096."""

    length: int
    starts: tuple[int, ...]
    sizes: tuple[int, ...]
    weight_steps: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class TilePlan:
    """Tiles covering a height x width area, row-major, with separable blend weights."""

    height: int
    width: int
    rows: AxisPlan
    columns: AxisPlan

    @property
    def tiles(self) -> list[Tile]:
        """Every tile, row by row."""
        return [Tile(ys, xs, yh, xw)
                for ys, yh in zip(self.rows.starts, self.rows.sizes)
                for xs, xw in zip(self.columns.starts, self.columns.sizes)]

    def __len__(self) -> int:
        return len(self.rows.starts) * len(self.columns.starts)

    def weight(self, index: int) -> torch.Tensor:
        """Blend weight (height, width) float32 of tile `index`; over all tiles they sum to exactly 1.0."""
        row, column = divmod(index, len(self.columns.starts))
        wy = torch.tensor(self.rows.weight_steps[row], dtype=torch.float32) / _WEIGHT_STEPS
        wx = torch.tensor(self.columns.weight_steps[column], dtype=torch.float32) / _WEIGHT_STEPS
        return wy[:, None] * wx[None, :]

    @property
    def amplification(self) -> float:
        """Sum of tile areas over the covered area: the extra work a tiled pass does (1.0 = none)."""
        return sum(t.area for t in self.tiles) / (self.height * self.width)


def _split_evenly(total: int, parts: int) -> list[int]:
    """`total` as `parts` integers that differ by at most 1."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _ramp_steps(width: int) -> list[int]:
    """Cosine ramp from 0 to 1 over `width` cells, as integer steps of 1/4096 (never 0 or 4096 inside)."""
    return [min(_WEIGHT_STEPS - 1, max(1, round(_WEIGHT_STEPS * (0.5 - 0.5 * math.cos(math.pi * (i + 0.5) / width)))))
            for i in range(width)]


def _axis_plan(length: int, tile: int, overlap: int, align: int) -> AxisPlan:
    """Tiles of at most `tile` (multiples of `align`) covering `length` with at least `overlap` between neighbours."""
    if length <= tile:
        return AxisPlan(length, (0,), (length,), ((_WEIGHT_STEPS,) * length,))
    count = math.ceil((length - overlap) / (tile - overlap))
    # The least aligned total that leaves every seam `overlap` wide; split as evenly as alignment allows
    # (sizes differ by at most one `align`), rather than rounding every tile up, which costs up to 6% per axis.
    units = math.ceil((length + (count - 1) * overlap) / align)
    sizes = [u * align for u in _split_evenly(units, count)]
    seams = _split_evenly(sum(sizes) - length, count - 1)
    starts = [0]
    for size, seam in zip(sizes[:-1], seams):
        starts.append(starts[-1] + size - seam)
    ends = [s + n for s, n in zip(starts, sizes)]
    # Blend zone k sits in the middle of the overlap of tiles k and k+1; zones never touch, so every cell is
    # shared by at most two tiles per axis and a pair's weights (q, 4096 - q) add up exactly.
    zones = []
    for k in range(count - 1):
        lo, hi = starts[k + 1], ends[k]
        left_limit = zones[-1][1] if zones else 0
        lo = max(lo, left_limit)
        zones.append((lo, hi))
    steps = []
    for k in range(count):
        w = [0] * sizes[k]
        own_lo = zones[k - 1][1] if k > 0 else 0
        own_hi = zones[k][0] if k < count - 1 else length
        for p in range(own_lo, own_hi):
            w[p - starts[k]] = _WEIGHT_STEPS
        if k > 0:
            lo, hi = zones[k - 1]
            for i, q in enumerate(_ramp_steps(hi - lo)):
                w[lo + i - starts[k]] = q
        if k < count - 1:
            lo, hi = zones[k]
            for i, q in enumerate(_ramp_steps(hi - lo)):
                w[lo + i - starts[k]] = _WEIGHT_STEPS - q
        steps.append(tuple(w))
    return AxisPlan(length, tuple(starts), tuple(sizes), tuple(steps))


def tile_plan(height: int, width: int, tile_size: int, overlap: int, align: int = 1) -> TilePlan:
    """Plan tiles of at most `tile_size` with `overlap` for a height x width area, all in the same units.

    An area no larger than `tile_size` is one tile of its own size. Otherwise tile sides are multiples of
    `align`, split evenly (they differ by at most `align`) and at least `overlap` apart; an overlap of more
    than half a tile is reduced to half.
    """
    if height < 1 or width < 1:
        raise ValueError(f"Cannot tile an area of {height} x {width}: both sides must be at least 1.")
    if align < 1:
        raise ValueError(f"Tile alignment must be at least 1, got {align}.")
    tile = tile_size // align * align
    if tile < align:
        raise ValueError(f"Tile size {tile_size} is smaller than the alignment {align}; use a tile of at least {align}.")
    if overlap < 0:
        raise ValueError(f"Overlap must not be negative, got {overlap}.")
    overlap = min(overlap, tile // 2)
    return TilePlan(height, width, _axis_plan(height, tile, overlap, align), _axis_plan(width, tile, overlap, align))


def latent_tile_plan(latent_height: int, latent_width: int, tile_size: int = DEFAULT_TILE_SIZE,
                     overlap: int = DEFAULT_OVERLAP, latent_scale: int = LATENT_SCALE,
                     align: int = LATENT_ALIGN) -> TilePlan:
    """Plan latent tiles from pixel settings (`tile_size`, `overlap` in pixels; latent = pixels / latent_scale)."""
    if tile_size < latent_scale * align:
        raise ValueError(f"Tile size {tile_size} px is too small: use at least {latent_scale * align} px.")
    latent_overlap = math.ceil(overlap / latent_scale)
    return tile_plan(latent_height, latent_width, tile_size // latent_scale, latent_overlap, align)

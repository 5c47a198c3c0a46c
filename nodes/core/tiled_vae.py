"""Exact tiled VAE encode/decode in one pass: the network runs layer by layer, each layer over spatial tiles.

Every 3x3 conv sees its true neighbours (a 1-px halo per conv, the image border zero-padded as the module does),
every GroupNorm uses statistics of the whole image (per-channel moments merged while the previous layer's tiles
are written), and the mid-block self-attention runs over the whole image in query chunks. So the result equals
the untiled one up to float rounding (on CPUs fast at bfloat16, a float32 run takes the attention's two products in
bfloat16: `BF16_ATTENTION_MIN_SPEEDUP`), with almost no extra compute; memory is the full activation between two
layers (a half compute dtype's tiles as computed; float32 ones in float16 when large and finite) instead of every
intermediate of the untiled graph.

Where those full activations do not fit the memory budget, a `SpillStore` keeps them in a temporary file mapped into
memory instead: the same arithmetic (so the same result, the mid-block attention's sum split over blocks of keys),
and the pages each tile touched are handed back to the kernel every `SPILL_RESIDENT_BYTES`, so the process holds
only tiles, one block of the attention's keys and values, and the output, whatever the image's size; the kernel
caches the files in free RAM and writes them to disk when RAM is short (`memory_needs` says how much of each a run
takes).
Tile inputs are copied into scratch buffers reused from tile to tile (a fresh large tensor per tile costs a page
fault per 4 KiB), and the run uses channels_last on CPU, where oneDNN's convs are fastest.

Works on the host's `first_stage_model` by duck typing (SD1.x/SD2/SDXL/SD3/Flux-shaped AutoencoderKL:
`encoder`/`decoder` made of conv_in, ResnetBlocks, AttnBlocks, Down/Upsample, norm_out, conv_out). Anything else
raises `UnsupportedVAE` so the caller can fall back to the host's tiled path. Imports nothing from ComfyUI.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import math
import mmap
import os
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .cancel import check_cancel
from .user_errors import shown_as_pack

logger = logging.getLogger("astria")

DEFAULT_TILE_ELEMENTS = 128 * 512 * 512
"""Per-tile budget in activation elements (channels x height x width): a 512 px tile at the 128-channel layers.
Tiles this size keep conv efficiency at the untiled level while the 1-px halo costs under 1%."""
SMALL_ACTIVATION_BYTES = 256 * 2**20
"""Activations below this stay float32; larger ones are stored as float16 when every value fits."""
ATTENTION_SCORE_ELEMENTS = 2**26
"""Queries x keys per attention call: at most 256 MiB of float32 scores where the kernel holds them (the CPU's flash
kernel does not), about a second of work on 2 CPU cores (Cancel is asked between calls), and enough queries per call
for the CPU kernel's speed (measured at 262144 keys, a 4096 px decode: 64 queries 114 GFLOPS, 256 queries 142)."""
LOCAL_ATTENTION_BLOCK = 64
"""Local attention (opt-in, inexact): query blocks of this many latent positions a side (512 px of the image)."""
LOCAL_ATTENTION_HALO = 32
"""Local attention: a query block's window reaches this many positions beyond it on each side (256 px), so it sees
128 x 128 keys (1024 px) instead of the whole image's: a 2048 px image's attention takes ~0.19x the exact one's work,
an 8192 px image's ~0.016x (the exact attention grows with the area squared, the local one with the area)."""
KEY_BLOCK_BYTES = 64 * 2**20
"""A spilled run's exact attention copies the keys and values out of the spill files in blocks of this many bytes
(both together: 16384 positions at 512 channels) and sweeps every query over each block, merging the blocks'
results by their log-sum-exp (`_attend_in_key_blocks`). So the keys and values the process holds stop growing with
the image: read whole by every query chunk, they were all resident mapped pages (1 GiB at a 4096 px decode, 4 GiB at
8192 px, counted in RSS)."""
BF16_ATTENTION_MIN_SPEEDUP = 1.5
"""A float32 run on the CPU takes the exact attention's two products (queries x keys, weights x values) in bfloat16
with float32 sums, and keeps its keys and values in bfloat16, where this CPU multiplies bfloat16 matrices at least
this many times faster than float32 ones (AVX512-BF16, AMX; timed once a process: `cpu_bf16_matmul_speedup`). The
scores, softmax and sums stay float32. Measured on 2 Zen cores (bfloat16 products 3.5-4.9x float32's speed): the
attention 0.38x the float32 flash kernel's time at 65536 keys; a spilled 2048 px decode 157.4 s against 184.2 s, max
abs to untiled 2.6e-3 against 1.9e-3 (bench/vae_tiling.py), under the 0.01 that counts as exact. Each layer first
probes its own scores (`BF16_PROBE_MAX_ERROR`) and runs float32 where bfloat16 would round them too coarsely.
Elsewhere (bfloat16 emulated, slower than float32) the attention stays float32, and so does the encoder's
(`ENCODER_BF16_ATTENTION`)."""
ENCODER_BF16_ATTENTION = False
"""Whether a float32 encode takes the bfloat16 attention products too (the decoder does, see above). It does not:
the latent carries the products' rounding further than the decoder's pixels do. Measured on the random-weight SD VAE
at 2048 px (bench/vae_tiling.py, 2 Zen cores, one process per case): with them the encode came out 1.07e-2 off
untiled (1.02e-2 in an earlier run), over the 0.01 that counts as exact (the decode: 2.7e-3); without them 8.56e-3,
for 1.12x the time (153.6 s against 136.9 s; untiled 269.8 s). The rest is the float16 storage of the large
activations."""
SPEEDUP_PROBE_TRIES = 5
"""`cpu_bf16_matmul_speedup` times this many 512 x 512 x 2048 products of each dtype, alternating, and compares the
fastest of each: one stall (a reclaim under memory pressure, another process) cannot tip the verdict."""
BF16_PROBE_SIDE = 32
"""Before an attention layer takes bfloat16 products, a probe runs its own queries, keys and values at an evenly
spread grid of this many positions a side (1024 in all) through both kernels (`bf16_attention_error`)."""
BF16_PROBE_MAX_ERROR = 5e-2
"""The probe's largest difference (over the values' rms) up to which the layer keeps bfloat16 products; above it the
layer runs in float32. bfloat16's 8 bits round a score s by up to |s| / 512, so large scores (a peaked softmax, large
queries and keys) make the products inexact. Measured: the random-weight SD VAE's layers probe at 1.8e-2 (decode)
and 6.3e-3 (encode), their whole passes 2.6e-3 and 9.0e-3-1.07e-2 off untiled (so the encoder no longer takes
them: `ENCODER_BF16_ATTENTION`; a low probe does not promise a small output error); random scores of std 1 probe at
~1e-3, of std 4 at 3-9e-2, of std 16 at 0.2-0.5. A trained VAE's scores were not measured here (no weights on this
machine): this bound is a guard against gross rounding, not a measurement of its output."""
BF16_SCORE_ELEMENTS = 2**23
"""Queries x keys per product in the bfloat16 attention: 32 MiB of float32 scores, which the softmax passes over in
the CPU's cache (2**22 and 2**24 measured 5-15% slower at 65536 keys)."""
SPILL_RESIDENT_BYTES = 128 * 2**20
"""A spilled run hands the file pages it touched back to the kernel once its tiles read or wrote this many bytes of
the files (counted where they are read and written: `_Settings.touch`). The kernel maps file pages around each fault
too (fault-around), so up to about twice this is resident between hand-backs: measured at a 1024 px decode, 22%
less RSS than a tile count at 256 MiB (643 vs 826 MiB) for the same time within noise (bench/vae_tiling.py)."""
READ_AHEAD_SAMPLES = 8
"""`SpillStore.will_need` looks at this many of a tensor's contiguous runs (a channels_last tile's rows), evenly
spread, and asks for the whole tensor's pages ahead when one of them has a page out of RAM."""
MAX_READ_AHEAD_RUNS = 4096
"""`SpillStore.will_need` asks ahead for at most this many contiguous runs of a tensor (a channels_last tile has one
per row); a tensor in more pieces is left to its page faults."""
TILE_COPIES = 8
"""Tile-sized float buffers alive at once in the worst layer (input and region scratch, conv output and the
library's own reorders, the shortcut): the tiles' share of `memory_needs`."""
_FP16_SAFE = 60000.0  # float16 tops out at 65504; keep margin so later sums in the tile stay finite


@shown_as_pack
class UnsupportedVAE(Exception):
    """The VAE is not an AutoencoderKL shape this module knows; use the host's own tiled encode/decode."""


class SpillStore:
    """Full activations in unlinked temporary files under `directory`, mapped into memory (MAP_SHARED).

    Pages a tile touched go back to the kernel (`release`, MADV_DONTNEED: for a shared file mapping the data stays
    in the page cache or on disk, the process stops holding it). When an activation's last tensor is gone its file
    is kept for the next one (grown when that one is larger): a first write into freshly reserved blocks costs the
    filesystem several times a write into blocks written before (ext4: 1.56 vs 0.18 s per GiB through a mapping on
    2 cores), and a run writes each layer's activation once. Free files are closed when the store is.

    Every mapping is advised MADV_RANDOM: otherwise a fault reads around it (the disk's read-ahead, 8 MiB here) into
    large page-cache folios that Linux 6.x maps whole, so a tile touching 200 bytes of each 128 KiB row made the whole
    file resident (235 MB of 256 MB; 8 MB advised) and the spilled decode's file pages grew with the image's width
    (2048 px: 639 MiB resident, 282 MiB advised)."""

    def __init__(self, directory: str | None = None):
        self.directory = directory
        self.bytes_now = 0
        """Bytes of the store's files, in use or kept for reuse (the disk they take)."""
        self.peak_bytes = 0
        self.reused = 0
        """How many activations went into a file an earlier one had used."""
        self._maps: weakref.WeakSet = weakref.WeakSet()
        self._spans: dict = {}  # live mappings: address -> (bytes, file, bytes written before), to find files
        self._written: dict = {}  # file -> how far into it tiles have written (`will_need` with writing)
        self._free: list = []  # files whose tensors are gone, kept open for reuse
        weakref.finalize(self, _close_files, self._free)

    def empty(self, shape, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
        """An uninitialised (B, C, H, W) tensor backed by a file: a free one of the store's (`_take_free`), or a
        new one."""
        count = math.prod(shape)
        nbytes = max(1, count * torch.empty(0, dtype=dtype).element_size())
        handle = self._take_free(nbytes)
        if handle is None:
            handle = tempfile.TemporaryFile(dir=self.directory, prefix="astria-vae-")
        else:
            self.reused += 1
        size = _file_size(handle)
        written = self._written.pop(handle, 0)  # bytes earlier activations wrote: to read before overwriting them
        try:
            if size < nbytes:
                # reserve the blocks now: a full disk then fails here (OSError) instead of as SIGBUS on a later write
                os.posix_fallocate(handle.fileno(), 0, nbytes)
                self.bytes_now += nbytes - size
                size = nbytes
            mapping = mmap.mmap(handle.fileno(), nbytes)
            mapping.madvise(mmap.MADV_RANDOM)  # no read-around: see SpillStore
        except BaseException:
            self.bytes_now -= size
            handle.close()
            raise
        self.peak_bytes = max(self.peak_bytes, self.bytes_now)
        self._maps.add(mapping)
        weakref.finalize(mapping, _recycle, weakref.ref(self), handle)
        flat = torch.frombuffer(mapping, dtype=dtype, count=count)
        self._spans[flat.data_ptr()] = (nbytes, handle, min(written, nbytes))
        weakref.finalize(mapping, self._spans.pop, flat.data_ptr(), None)
        if channels_last:
            b, c, h, w = shape
            return flat.view(b, h, w, c).permute(0, 3, 1, 2)
        return flat.view(shape)

    def _take_free(self, nbytes: int):
        """A free file for `nbytes` (the smallest holding them without doubling them, else the largest smaller one,
        to be grown), or None; the other free files are closed, so the files never take much more disk than the
        activations in use."""
        fitting = [handle for handle in self._free if nbytes <= _file_size(handle) <= 2 * nbytes]
        smaller = [handle for handle in self._free if _file_size(handle) < nbytes]
        chosen = (min(fitting, key=_file_size) if fitting else max(smaller, key=_file_size) if smaller else None)
        for handle in self._free:
            if handle is not chosen:
                self.bytes_now -= _file_size(handle)
                self._written.pop(handle, None)
                handle.close()
        self._free.clear()
        return chosen

    def will_need(self, tensor: torch.Tensor, writing: bool = False) -> None:
        """Ask the kernel to read the file pages under `tensor` (a view of one of the store's files) ahead, one
        request per contiguous run of it (a tile's rows), before they are read, or `writing` over (a write into a
        mapped page of a file reads the page first: where an earlier activation left it, not in fresh blocks).

        Once the files outgrow free RAM their pages go to disk, and MADV_RANDOM makes every fault read 4 KiB alone:
        a tile's 17 MB then took thousands of small reads (6144 px decode: 31 M major faults, progress gaps to
        2.8 s). While the files stay in RAM the requests would only cost time (a 1024 px decode 1.07x), so they are
        made only where `READ_AHEAD_SAMPLES` of the runs, evenly spread, find a page out of RAM (`_resident`)."""
        address = tensor.data_ptr()
        span = next(((base, handle, written) for base, (nbytes, handle, written) in list(self._spans.items())
                     if base <= address < base + nbytes), None)
        if span is None or tensor.numel() == 0:
            return
        base, handle, written = span
        size = tensor.element_size()
        offsets, run = _contiguous_runs(tensor)
        if len(offsets) > MAX_READ_AHEAD_RUNS:
            return
        start = address - base
        runs = [(start + offset * size, run * size) for offset in offsets]  # in bytes, from the file's start
        if writing:  # fresh blocks read as zeros without the disk: only the bytes an earlier activation left
            self._written[handle] = max(self._written.get(handle, written), runs[-1][0] + runs[-1][1])
            runs = [(at, min(length, written - at)) for at, length in runs if at < written]
            if not runs:
                return
        sampled = runs[::max(1, len(runs) // READ_AHEAD_SAMPLES)]
        if all(_resident(base + at, length) for at, length in sampled):
            return
        for at, length in runs:
            os.posix_fadvise(handle.fileno(), at, length, os.POSIX_FADV_WILLNEED)

    def release(self) -> None:
        """Hand every live file's resident pages back to the kernel (the data stays in the file)."""
        for mapping in list(self._maps):
            mapping.madvise(mmap.MADV_DONTNEED)


def _resident(address: int, nbytes: int) -> bool:
    """Whether every page of the mapped bytes [address, address + nbytes) is in RAM (mincore); True where the OS
    cannot say."""
    start = address - address % mmap.PAGESIZE
    pages = -(-(address + nbytes - start) // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    if _LIBC is None or _LIBC.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * mmap.PAGESIZE), vector):
        return True
    return all(page & 1 for page in vector)


def _contiguous_runs(tensor: torch.Tensor) -> tuple[list[int], int]:
    """A strided tensor as runs of elements contiguous in memory: (each run's offset from the first element, the
    run's length), both in elements."""
    dims = sorted(((n, stride) for n, stride in zip(tensor.shape, tensor.stride()) if n > 1), key=lambda d: -d[1])
    run = 1
    while dims and dims[-1][1] == run:
        run *= dims.pop()[0]
    offsets = [0]
    for n, stride in dims:
        offsets = [offset + i * stride for offset in offsets for i in range(n)]
        if len(offsets) > MAX_READ_AHEAD_RUNS:
            break
    return offsets, run


def _file_size(handle) -> int:
    """The size of an open file in bytes."""
    return os.fstat(handle.fileno()).st_size


def _recycle(store_ref, handle) -> None:
    """A spill file's last tensor is gone: back to its store's free files, or closed when the store is gone."""
    store = store_ref()
    if store is None:
        handle.close()
    else:
        store._free.append(handle)


def _close_files(handles: list) -> None:
    """Close a collected store's free files (unlinked: their space goes back to the disk)."""
    for handle in handles:
        handle.close()
    handles.clear()


SPILL_SUPPORTED = sys.platform.startswith("linux") and all(
    hasattr(os, name) for name in ("posix_fallocate", "posix_fadvise")) and hasattr(mmap, "MADV_DONTNEED")
"""Whether this OS has what a `SpillStore` uses (Linux: posix_fallocate, posix_fadvise, madvise, mincore); elsewhere
(Windows, macOS) a run keeps its activations in RAM or takes the host's tiled VAE."""
_LIBC = ctypes.CDLL(None, use_errno=True) if SPILL_SUPPORTED else None
RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
"""Filesystems whose files live in RAM: a spill file there saves no memory."""


def mount_type(path: str, mounts: str) -> str | None:
    """The filesystem type of the mount holding `path` (an absolute, resolved path), from the text of
    /proc/mounts (the longest mount point that contains it, the last such line); None when no line matches."""
    best, found = -1, None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best:  # the later of two mounts on one point is the one in force
            best, found = len(point), fields[2]
    return found


@dataclass
class _Settings:
    device: torch.device
    dtype: torch.dtype
    tile_elements: int
    storage_dtype: torch.dtype | None
    should_cancel: Callable[[], bool] | None
    progress: Callable[[int, int], None] | None
    channels_last: bool = False
    spill: SpillStore | None = None
    local_attention: bool = False
    attention_dtype: torch.dtype | None = None  # the attention's keys, values and products; None: `dtype`
    done: int = 0
    total: int = 0
    buffers: dict = field(default_factory=dict)
    _touched: int = 0

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout of stored activations and scratch tiles."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """Storage for a full activation: in the spill file when the run spills, else on the compute device."""
        if self.spill is not None:
            return self.spill.empty(shape, dtype, self.channels_last)
        return torch.empty(shape, dtype=dtype, device=self.device, memory_format=self.memory_format)

    def stored_copy(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`tensor` converted to `dtype` in full-activation storage, copied in row bands (a spilled copy hands
        each band's pages back, so converting never holds two whole activations in RAM)."""
        if self.spill is None:
            return tensor.to(self.device, dtype, memory_format=self.memory_format, copy=True)
        out = self.empty(tensor.shape, dtype)
        b, c, h, w = tensor.shape
        band = max(1, self.tile_elements // max(1, b * c * w))
        for start in range(0, h, band):
            self.spill.will_need(out[:, :, start:start + band], writing=True)
            out[:, :, start:start + band].copy_(tensor[:, :, start:start + band])
            self.spill.release()
        return out

    def scratch(self, slot: int, shape) -> torch.Tensor:
        """A dense compute-dtype tensor of `shape` (B, C, H, W) in the run's memory format, backed by a buffer
        reused from tile to tile.

        A fresh large tensor per tile costs as much as a pass over it (the allocator hands back new pages that fault
        in on first touch), so tile inputs live in per-slot buffers kept for the whole run."""
        size = math.prod(shape)
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.numel() < size:
            self.buffers.pop(slot, None)  # drop the smaller one before allocating its successor
            buffer = self.buffers[slot] = torch.empty(size, dtype=self.dtype, device=self.device)
        if self.channels_last:
            b, c, h, w = shape
            return buffer[:size].view(b, h, w, c).permute(0, 3, 1, 2)
        return buffer[:size].view(shape)

    def tick(self) -> None:
        check_cancel(self.should_cancel, "Tiled VAE")

    def count(self) -> None:
        """Progress by one unit of work inside a tile (an attention query chunk): no page hand-back."""
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def advance(self) -> None:
        """After a tile: progress, and a spilled run's touched pages back to the kernel when they are due."""
        self.count()
        self.release_if_due()

    def touch(self, stored: torch.Tensor, ahead: str | None = None) -> None:
        """Count the bytes a tile reads from or writes to full-activation storage (file pages, in a spilled run);
        `ahead` ("read" or "write"): about to be, so a spilled run asks for its pages ahead (`SpillStore.will_need`)."""
        if self.spill is not None:
            self._touched += stored.numel() * stored.element_size()
            if ahead:
                self.spill.will_need(stored, writing=ahead == "write")

    def release_if_due(self) -> None:
        """Hand a spilled run's touched file pages back to the kernel once `SPILL_RESIDENT_BYTES` were touched."""
        if self.spill is not None and self._touched >= SPILL_RESIDENT_BYTES:
            self.spill.release()
            self._touched = 0


def _default_storage_dtype(elements: int, settings: _Settings) -> torch.dtype:
    """How a full activation is kept between layers when the caller does not say.

    Tiles come out in the compute dtype, so a bfloat16/float16 run keeps them as they are: lossless, and no
    float16 range check (each check is a GPU sync that stalls the launch queue, once per tile). A float32 run keeps
    small activations in float32 and large ones in float16, checked tile by tile (`_Activation.write`)."""
    if settings.dtype in (torch.bfloat16, torch.float16):
        return settings.dtype
    return torch.float32 if elements * 4 <= SMALL_ACTIVATION_BYTES else torch.float16


class _Activation:
    """A full (B, C, H, W) activation kept between layers, with per-channel sums for the next GroupNorm."""

    def __init__(self, batch: int, channels: int, height: int, width: int, settings: _Settings,
                 storage: torch.Tensor | None = None):
        self.shape = (batch, channels, height, width)
        self.device = settings.device
        self.settings = settings
        if storage is not None:
            self.data = storage
        else:
            dtype = settings.storage_dtype or _default_storage_dtype(batch * channels * height * width, settings)
            self.data = settings.empty(self.shape, dtype)
        self.count = 0  # positions per channel gathered so far, and their float64 mean and M2 (sum of squared
        self.means = torch.zeros(batch, channels, dtype=torch.float64, device=settings.device)  # deviations)
        self.m2 = torch.zeros(batch, channels, dtype=torch.float64, device=settings.device)

    @classmethod
    def of(cls, tensor: torch.Tensor, settings: _Settings) -> _Activation:
        """Wrap an input tensor (kept float32) and gather its sums."""
        act = cls(*tensor.shape, settings, storage=settings.stored_copy(tensor, torch.float32))
        act._add_stats(tensor.to(settings.device, torch.float32))
        return act

    def _add_stats(self, tile: torch.Tensor, computed: torch.Tensor | None = None,
                   margins: tuple[int, int, int, int] = (0, 0, 0, 0)) -> torch.Tensor:
        """Merge the tile's per-channel moments into the activation's (Chan's parallel update, float64); returns an
        upper bound of every |value| in it. `computed`, when given, is the uncropped tensor the tile was cut from
        with `margins` (top, bottom, left, right) removed: its moments less those of the margins are the tile's.
        The bound stays a tensor on the tile's device: reading it is a GPU sync, done only where float16 storage
        needs it."""
        count, means, m2, bound = _tile_moments(tile, computed, margins)
        total = self.count + count
        delta = means - self.means
        self.means += delta * (count / total)
        self.m2 += m2 + delta.square() * (self.count * count / total)
        self.count = total
        return bound

    def write(self, rows: slice, cols: slice, tile: torch.Tensor, computed: torch.Tensor | None = None,
              margins: tuple[int, int, int, int] = (0, 0, 0, 0)) -> None:
        """Store a tile and add it to the channel moments (taken before any rounding to storage); `computed` and
        `margins` as in `_add_stats`."""
        bound = self._add_stats(tile, computed, margins)
        whole = (rows.stop - rows.start, cols.stop - cols.start) == self.shape[2:]
        if (whole and self.data is not None and self.data.dtype == torch.float32 and tile.dtype == torch.float32
                and self.data.device == tile.device):
            self.data = tile  # one tile covers the layer: keep it, no copy
            return
        # a small bound proves the tile fits float16 for free; only otherwise (or for inf/nan) look at the values
        if (self.data.dtype == torch.float16 and tile.dtype != torch.float16
                and not bool(bound < _FP16_SAFE) and not bool(tile.abs().max() < _FP16_SAFE)):
            self.data = self.settings.stored_copy(self.data, torch.float32)  # e.g. SDXL's VAE: beyond float16
        stored = self.data[:, :, rows, cols]
        self.settings.touch(stored, ahead="write")
        stored.copy_(tile)  # also across devices when activations are kept in RAM

    def read(self, rows: slice, cols: slice, settings: _Settings, slot: int = 0) -> torch.Tensor:
        """A region in the compute dtype, contiguous, in scratch slot `slot`: the caller may modify it in place."""
        region = self.data[:, :, rows, cols]
        settings.touch(region, ahead="read")
        return settings.scratch(slot, region.shape).copy_(region)

    def region(self, rows: slice, cols: slice, settings: _Settings, slot: int = 1) -> torch.Tensor:
        """A region in the compute dtype to read only: a view of the storage when it has that dtype already, else
        a converted copy in scratch slot `slot` (a mixed-dtype add is several times slower than copy + add)."""
        region = self.data[:, :, rows, cols]
        settings.touch(region, ahead="read")
        if region.dtype == settings.dtype and region.device == settings.device:
            return region
        return settings.scratch(slot, region.shape).copy_(region)

    def group_stats(self, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (batch, channel) scale and shift that apply `norm` (GroupNorm) with whole-image statistics."""
        groups, eps = norm.num_groups, norm.eps
        b, c, h, w = self.shape
        per_channel = c // groups
        channel_means = self.means.view(b, groups, per_channel)
        mean = channel_means.mean(-1)
        spread = (channel_means - mean[..., None]).square().sum(-1) * self.count
        var = (self.m2.view(b, groups, per_channel).sum(-1) + spread) / (per_channel * self.count)
        inv_std = torch.rsqrt(var + eps)
        weight = norm.weight.detach().to(self.device, torch.float64)
        bias = norm.bias.detach().to(self.device, torch.float64)
        scale = inv_std.repeat_interleave(per_channel, 1) * weight
        shift = bias - mean.repeat_interleave(per_channel, 1) * scale
        return scale[:, :, None, None].float(), shift[:, :, None, None].float()


# ---------------------------------------------------------------------------------------------------------------
# module checks (duck typing; no ComfyUI import)


def _tile_moments(tile: torch.Tensor, computed: torch.Tensor | None,
                  margins: tuple[int, int, int, int]) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions, per (B, C) mean, per (B, C) M2, a bound of every |value|) of a tile, float64.

    On the CPU, a float32 channels_last tensor straight from a conv takes one fused pass of the library's batch-norm
    statistics per sample (mean and variance in float32, ~8e-6 of the variance), its margins (a conv's halo: 1-3% of
    it) are taken out exactly in float64: 5x faster than row sums and row norms over the cropped view, which every
    other tile still takes. Moments, not sums of squares: no cancellation where the mean is large next to the
    spread."""
    source = computed if computed is not None else tile
    if (source.device.type == "cpu" and source.dtype == torch.float32 and source.shape[1] > 1
            and source.is_contiguous(memory_format=torch.channels_last)):
        count, means, m2 = _fused_moments(source)
        bound = (means.abs() + m2.sqrt()).amax()  # |x - mean| <= sqrt(M2) for every x of a channel
        top, bottom, left, right = margins
        h, w = source.shape[2:]
        for strip in (source[:, :, :top], source[:, :, h - bottom:], source[:, :, top:h - bottom, :left],
                      source[:, :, top:h - bottom, w - right:]):
            if strip.numel():
                count, means, m2 = _without(count, means, m2, *_exact_moments(strip))
        return count, means, m2, bound
    return _row_moments(tile)


def _fused_moments(tile: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Moments of a contiguous channels_last float32 tile by the batch-norm statistics kernel, sample by sample."""
    count = tile.shape[2] * tile.shape[3]
    stats = [torch.batch_norm_update_stats(tile[i:i + 1], None, None, 0.0) for i in range(tile.shape[0])]
    means = torch.stack([mean for mean, _ in stats]).to(torch.float64)
    variances = torch.stack([var for _, var in stats]).to(torch.float64)  # biased: M2 / count
    return count, means, variances * count


def _exact_moments(tile: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Moments of a small tile (a halo strip) in float64."""
    values = tile.to(torch.float64)
    means = values.mean(dim=(2, 3))
    return tile.shape[2] * tile.shape[3], means, (values - means[..., None, None]).square().sum(dim=(2, 3))


def _without(count: int, means: torch.Tensor, m2: torch.Tensor, part_count: int, part_means: torch.Tensor,
             part_m2: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The moments of a set with a part of it (given by its own moments) taken out: Chan's update in reverse."""
    rest = count - part_count
    rest_means = (means * count - part_means * part_count) / rest
    delta = part_means - rest_means
    return rest, rest_means, (m2 - part_m2 - delta.square() * (rest * part_count / count)).clamp_min(0)


def _row_moments(tile: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Moments from sums and L2 norms along rows (W), as (B, H, C) in the order the tile's memory runs, then float64
    across rows: one fast pass even over a cropped (strided) tile, where reducing (H, W) at once is 4-20x slower on
    CPU (var_mean slower still). The bound is the largest row norm."""
    tile = tile if tile.dtype == torch.float32 else tile.float()
    channels_last = tile.stride(1) == 1 and tile.shape[1] > 1
    rows = tile.permute(0, 2, 3, 1) if channels_last else tile.permute(0, 2, 1, 3)  # W is dim 2 / dim 3
    along_w = 2 if channels_last else 3
    count = tile.shape[2] * tile.shape[3]
    sums = rows.sum(dim=along_w).to(torch.float64).sum(1)
    norms = torch.linalg.vector_norm(rows, dim=along_w)
    squares = norms.to(torch.float64).square().sum(1)
    means = sums / count
    return count, means, (squares - sums * means).clamp_min(0), norms.amax()


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise UnsupportedVAE(f"Unsupported VAE layer: {what}. Falling back to the host's tiled VAE is needed.")


def _is_conv(module, kernel: int, stride: int = 1) -> bool:
    return (isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (kernel, kernel)
            and tuple(module.stride) == (stride, stride) and tuple(module.dilation) == (1, 1)
            and module.groups == 1 and module.padding_mode == "zeros")


def _check_same_conv(module, name: str) -> None:
    _require(_is_conv(module, 3) and tuple(module.padding) == (1, 1)
             or _is_conv(module, 1) and tuple(module.padding) == (0, 0), f"{name} is not a 3x3/1x1 same conv")


def _check_norm(module, name: str) -> None:
    _require(isinstance(module, torch.nn.GroupNorm) and module.affine, f"{name} is not an affine GroupNorm")


def _check_resnet(block, name: str) -> None:
    _require(all(hasattr(block, a) for a in ("norm1", "conv1", "norm2", "conv2")), f"{name} is not a ResnetBlock")
    _require(getattr(block, "temb_proj", None) is None, f"{name} uses a timestep embedding")
    for part in ("norm1", "norm2"):
        _check_norm(getattr(block, part), f"{name}.{part}")
    for part in ("conv1", "conv2"):
        _check_same_conv(getattr(block, part), f"{name}.{part}")
    shortcut = _shortcut(block)
    if shortcut is not None:
        _check_same_conv(shortcut, f"{name} shortcut")


def _shortcut(block):
    if block.in_channels == block.out_channels:
        return None
    return block.conv_shortcut if getattr(block, "use_conv_shortcut", False) else block.nin_shortcut


def _check_attention(block, name: str) -> None:
    _require(all(hasattr(block, a) for a in ("norm", "q", "k", "v", "proj_out")), f"{name} is not an AttnBlock")
    _check_norm(block.norm, f"{name}.norm")
    for part in ("q", "k", "v", "proj_out"):
        _require(_is_conv(getattr(block, part), 1), f"{name}.{part} is not a 1x1 conv")


# ---------------------------------------------------------------------------------------------------------------
# tiled layers


def _tiles(height: int, width: int, side: int):
    """Output regions (rows, cols) of at most side x side covering height x width, even sides where possible."""
    side = max(2, side - side % 2)
    for y in range(0, height, side):
        for x in range(0, width, side):
            yield slice(y, min(y + side, height)), slice(x, min(x + side, width))


def _side(settings: _Settings, channels: int) -> int:
    return max(16, int(math.sqrt(settings.tile_elements / max(1, channels))))


def _count(height: int, width: int, side: int) -> int:
    side = max(2, side - side % 2)
    return math.ceil(height / side) * math.ceil(width / side)


def _grow(region: slice, halo: int, limit: int) -> tuple[slice, int, int]:
    """The region widened by `halo` on both sides within [0, limit), and how much was added before / after."""
    start, stop = max(0, region.start - halo), min(limit, region.stop + halo)
    return slice(start, stop), region.start - start, stop - region.stop


def _crop(tile: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    return tile[:, :, top:tile.shape[2] - bottom, left:tile.shape[3] - right]


def _norm(tile: torch.Tensor, norm, stats) -> torch.Tensor:
    """GroupNorm of a tile with whole-image statistics and the module's affine weights."""
    scale, shift = stats
    if tile.dtype != torch.float32:
        return _scale_shift_half(tile, scale, shift)
    return torch.addcmul(shift, tile, scale)  # tile * scale + shift in one pass


def _norm_silu_(tile: torch.Tensor, norm, stats) -> torch.Tensor:
    """GroupNorm then SiLU: in place for float32 (the tile is a scratch copy: no fresh tensor, no page faults)."""
    scale, shift = stats
    if tile.dtype != torch.float32:
        return F.silu(_scale_shift_half(tile, scale, shift), inplace=True)
    torch.addcmul(shift, tile, scale, out=tile)
    return F.silu(tile, inplace=True)


def _scale_shift_half(tile: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """tile * scale + shift for a bfloat16/float16 tile, computed in float32 and rounded once.

    In the half dtype itself it cancels catastrophically where the mean is large next to the spread (shift ~
    -mean * scale): measured 0.04 max abs off the untiled bf16 decode on CUDA. Inference-mode batch_norm with
    mean 0, variance 1 and eps 0 is exactly this affine map in one fused pass that reads and writes the half dtype
    and computes in float32 (as torch's own group_norm does for half inputs); converting the tile to float32 first
    took four passes over twice the bytes (1.7x the time on CPU). Per sample: the statistics are per sample."""
    channels = tile.shape[1]
    zeros = torch.zeros(channels, dtype=torch.float32, device=tile.device)
    ones = torch.ones(channels, dtype=torch.float32, device=tile.device)
    parts = [F.batch_norm(tile[i:i + 1], zeros, ones, scale[i].flatten(), shift[i].flatten(), False, 0.0, 0.0)
             for i in range(tile.shape[0])]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _halo(conv) -> int:
    return conv.kernel_size[0] // 2


def _same_layer(source: _Activation, out_channels: int, settings: _Settings, compute, halo: int,
                extra: Callable | None = None, target: _Activation | None = None, regions=None) -> _Activation:
    """out[region] = compute(source[region + halo], *context)[cropped] (+ extra(region)), region by region, written
    to target; `regions` yields (rows, cols, *context) (default: `_tiles` at the layer's side, no context)."""
    b, c, h, w = source.shape
    out = target or _Activation(b, out_channels, h, w, settings)
    if regions is None:
        regions = _tiles(h, w, _side(settings, max(c, out_channels)))
    regions = iter(regions)
    upcoming = next(regions, None)
    while upcoming is not None:
        rows, cols, *context = upcoming
        upcoming = next(regions, None)
        settings.tick()
        grown_rows, top, bottom = _grow(rows, halo, h)
        grown_cols, left, right = _grow(cols, halo, w)
        tile_in = source.read(grown_rows, grown_cols, settings)
        if upcoming is not None and settings.spill is not None:
            # the next tile's pages come in while this one computes (a spilled run beyond RAM waits on the disk)
            next_rows, next_cols = upcoming[0], upcoming[1]
            settings.spill.will_need(source.data[:, :, _grow(next_rows, halo, h)[0], _grow(next_cols, halo, w)[0]])
            settings.spill.will_need(out.data[:, :, next_rows, next_cols], writing=True)
        settings.tick()  # reading a tile through the disk takes seconds at 6144 px: Cancel is asked again after it
        computed = compute(tile_in, *context)
        tile = _crop(computed, top, bottom, left, right)
        if extra is not None:
            tile.add_(extra(rows, cols))  # compute returned a fresh tensor, so adding in place is safe
        settings.tick()
        out.write(rows, cols, tile, computed, (top, bottom, left, right))
        settings.advance()
    return out


def _conv(source: _Activation, conv, settings: _Settings) -> _Activation:
    return _same_layer(source, conv.out_channels, settings, conv, _halo(conv))


def _norm_conv(source: _Activation, norm, conv, settings: _Settings) -> _Activation:
    stats = source.group_stats(norm)
    return _same_layer(source, conv.out_channels, settings, lambda t: conv(_norm_silu_(t, norm, stats)), _halo(conv))


def _resnet(source: _Activation, block, settings: _Settings) -> _Activation:
    hidden = _norm_conv(source, block.norm1, block.conv1, settings)
    stats = hidden.group_stats(block.norm2)
    shortcut = _shortcut(block)

    def compute(tile):
        return block.conv2(_norm_silu_(tile, block.norm2, stats))

    if shortcut is None:
        # out[region] needs source only at region, so it can overwrite source in place tile by tile
        target = _Activation(*source.shape, settings, storage=source.data)
        out = _same_layer(hidden, block.out_channels, settings, compute, _halo(block.conv2),
                          extra=lambda r, c: source.region(r, c, settings), target=target)
        source.data = None
        return out
    if _halo(shortcut) == 0:
        def short(r, c):
            return shortcut(source.read(r, c, settings, slot=1))

        if block.out_channels <= block.in_channels:
            # out[region] needs source only at region (1x1 shortcut; conv2 reads `hidden`), so out can live in
            # source's first channels, written tile by tile after that tile's shortcut is read: the decoder's first
            # full-resolution block then holds two activations instead of three (its peak, 1 GB less at 2048 px)
            b, _, h, w = source.shape
            target = _Activation(b, block.out_channels, h, w, settings,
                                 storage=source.data[:, :block.out_channels])
            out = _same_layer(hidden, block.out_channels, settings, compute, _halo(block.conv2), extra=short,
                              target=target)
            source.data = None
            return out
    else:
        short_act = _conv(source, shortcut, settings)
        def short(r, c):
            return short_act.region(r, c, settings)
    return _same_layer(hidden, block.out_channels, settings, compute, _halo(block.conv2), extra=short)


def _attention(source: _Activation, block, settings: _Settings) -> _Activation:
    """Self-attention, exact (every position attends to all of them) with queries in chunks and keys/values kept
    whole (in RAM), or swept block by block over the keys (`_attend_in_key_blocks`, a spilled run); or, with
    `settings.local_attention`, each query block attends to its window only (`_local_windows`)."""
    b, c, h, w = source.shape
    stats = source.group_stats(block.norm)
    streamed = _streams_keys(settings)
    dtype = settings.attention_dtype or settings.dtype
    if dtype == torch.bfloat16 and settings.dtype == torch.float32:  # bfloat16 chosen for speed: only if it holds
        dtype = _probed_attention_dtype(source, block, stats, settings)
        if dtype != settings.attention_dtype and streamed:  # float32 key blocks hold fewer keys: more sweeps
            settings.total += (_attention_units(h, w, c, settings, dtype)
                               - _attention_units(h, w, c, settings, settings.attention_dtype))
    if settings.spill is not None:  # they grow with the image (64 bytes per output pixel): in the files too
        keys = settings.spill.empty((b, 1, h * w, c), dtype, channels_last=False)
        values = settings.spill.empty((b, 1, h * w, c), dtype, channels_last=False)
    else:
        keys = torch.empty(b, 1, h * w, c, dtype=dtype, device=settings.device)
        values = torch.empty_like(keys)
    queries = settings.spill.empty((b, 1, h * w, c), dtype, channels_last=False) if streamed else None
    side = _side(settings, c)
    for rows, cols in _tiles(h, w, side):
        settings.tick()
        normed = _norm(source.read(rows, cols, settings), block.norm, stats)
        index = _flat_index(rows, cols, w, settings.device)
        for stored, projection in ((keys, block.k), (values, block.v), (queries, block.q)):
            if stored is not None:
                settings.touch(stored[:, 0].view(b, h, w, c)[:, rows, cols], ahead="write")
                stored[:, 0, index] = _positions(projection(normed)).to(stored.dtype)
        settings.advance()

    def attend(tile, keys, values):
        normed = _norm(tile, block.norm, stats)
        queries = _positions(block.q(normed))[:, None]
        chunk = _query_chunk(keys.shape[2])
        parts = []
        for i in range(0, queries.shape[2], chunk):
            settings.tick()  # one tile's queries against a large image's keys take minutes: Cancel between chunks
            if i:
                settings.count()  # and progress: one unit per chunk (the tile's last one is its advance)
            parts.append(_attend_chunk(queries[:, :, i:i + chunk], keys, values))
        return projected(tile, torch.cat(parts, dim=2))

    def projected(tile, attended):
        b, c, h, w = tile.shape
        attended = attended[:, 0].reshape(b, h, w, c).permute(0, 3, 1, 2).to(tile.dtype)  # channels_last, no copy
        return tile + block.proj_out(attended)

    # out[region] needs source only at region (keys and values are already whole), so overwrite it in place
    target = _Activation(*source.shape, settings, source.data)
    if streamed:
        attended = _attend_in_key_blocks(queries, keys, values, settings)
        del queries, keys, values  # their files go with them
        grid = attended.view(b, h, w, c)  # the tile's rows of it, to ask for ahead
        regions = ((rows, cols, _flat_index(rows, cols, w, settings.device), grid[:, rows, cols])
                   for rows, cols in _tiles(h, w, side))
        def project(tile, index, region):
            settings.spill.will_need(region)
            rows = attended[:, :, index]
            settings.touch(rows)
            return projected(tile, rows)

        out = _same_layer(source, c, settings, project, 0, target=target, regions=regions)
    elif settings.local_attention:  # each query block with the flat index of its window's keys
        windows = ((rows, cols, _flat_index(window_rows, window_cols, w, settings.device))
                   for rows, cols, window_rows, window_cols in _local_windows(h, w))
        out = _same_layer(source, c, settings, lambda tile, index: attend(tile, keys[:, :, index], values[:, :, index]),
                          0, target=target, regions=windows)
    else:
        out = _same_layer(source, c, settings, lambda tile: attend(tile, keys, values), 0, target=target)
    source.data = None
    return out


def _probed_attention_dtype(source: _Activation, block, stats, settings: _Settings) -> torch.dtype:
    """bfloat16 where a probe of this layer's own queries, keys and values (`BF16_PROBE_SIDE` positions a side, evenly
    spread) finds the bfloat16 products within `BF16_PROBE_MAX_ERROR` of float32 attention, else float32 (logged)."""
    _, _, h, w = source.shape
    grid = source.data[:, :, ::max(1, h // BF16_PROBE_SIDE), ::max(1, w // BF16_PROBE_SIDE)]
    if settings.spill is not None:
        settings.spill.will_need(grid)
    normed = _norm(grid.to(settings.device, settings.dtype, memory_format=settings.memory_format, copy=True),
                   block.norm, stats)
    queries, keys, values = (_positions(projection(normed))[:, None] for projection in (block.q, block.k, block.v))
    error = bf16_attention_error(queries, keys, values)
    if error <= BF16_PROBE_MAX_ERROR:
        return torch.bfloat16
    logger.info("Tiled VAE: this VAE's attention scores are too large for bfloat16 products (probe %.1e > %.0e): "
                "float32 products for a %dx%d attention layer (exact, slower)", error, BF16_PROBE_MAX_ERROR, h, w)
    return torch.float32


def bf16_attention_error(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> float:
    """The bfloat16 products' largest difference to float32 attention on these (B, 1, N, C) float32 tensors, over the
    values' rms (how far the fast kernel would move this layer's output, in units of its inputs' size)."""
    exact = F.scaled_dot_product_attention(queries, keys, values)
    rough = bf16_attention_with_lse(queries, keys.to(torch.bfloat16), values.to(torch.bfloat16))[0]
    scale = values.square().mean().sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    return float((rough - exact).abs().max() / scale)


def _streams_keys(settings: _Settings) -> bool:
    """Whether the exact attention sweeps the keys in blocks: a spilled run (on the CPU), where keys and values
    read whole by every query chunk would be resident file pages as large as the image's."""
    return settings.spill is not None and not settings.local_attention and settings.device.type == "cpu"


def _key_block(positions: int, channels: int, element_size: int) -> int:
    """Keys per block of a key-block sweep (`KEY_BLOCK_BYTES` of keys and values together)."""
    return max(1, min(positions, KEY_BLOCK_BYTES // (2 * channels * element_size)))


def _attend_chunk(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Softmax attention of a chunk of queries: the bfloat16 products where keys and values are kept in bfloat16 on
    the CPU (`BF16_ATTENTION_MIN_SPEEDUP`), else PyTorch's fused kernel."""
    if keys.dtype == torch.bfloat16 and keys.device.type == "cpu":
        return bf16_attention_with_lse(queries, keys, values)[0].to(queries.dtype)
    return F.scaled_dot_product_attention(queries, keys, values)


def bf16_attention_with_lse(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
    """Softmax attention (1/sqrt(C) scale) and each query's log-sum-exp, float32, for (B, 1, N, C) tensors, with the
    two products in bfloat16 (float32 sums inside the product; queries rounded to bfloat16, keys and values given in
    it) and the scores, softmax and normalisation in float32, `BF16_SCORE_ELEMENTS` scores at a time."""
    b, _, n, c = queries.shape
    scale = c ** -0.5
    out = torch.empty(b, 1, n, c, dtype=torch.float32, device=queries.device)
    lse = torch.empty(b, 1, n, dtype=torch.float32, device=queries.device)
    chunk = min(n, max(1, BF16_SCORE_ELEMENTS // keys.shape[2]))
    # one set of buffers for the call: fresh 32 MiB blocks per chunk grow the allocator's heap instead
    products = torch.empty(chunk, keys.shape[2], dtype=torch.bfloat16, device=queries.device)
    scores = torch.empty(chunk, keys.shape[2], dtype=torch.float32, device=queries.device)
    attended = torch.empty(chunk, c, dtype=torch.bfloat16, device=queries.device)
    for i in range(b):
        keys_t = keys[i, 0].to(torch.bfloat16).t()
        values_i = values[i, 0].to(torch.bfloat16)
        for j in range(0, n, chunk):
            m = min(chunk, n - j)
            torch.matmul(queries[i, 0, j:j + m].to(torch.bfloat16), keys_t, out=products[:m])
            weights = scores[:m].copy_(products[:m]).mul_(scale)
            top = weights.amax(-1, keepdim=True)
            weights.sub_(top).exp_()
            total = weights.sum(-1, keepdim=True)
            torch.matmul(products[:m].copy_(weights), values_i, out=attended[:m])
            out[i, 0, j:j + m].copy_(attended[:m]).div_(total)
            lse[i, 0, j:j + m] = total.log_().add_(top)[:, 0]
    return out, lse


@functools.cache
def cpu_bf16_matmul_speedup() -> float:
    """How many times faster this CPU multiplies bfloat16 matrices than float32 ones (timed once a process)."""
    operands = {dtype: (torch.randn(512, 512).to(dtype), torch.randn(512, 2048).to(dtype),
                        torch.empty(512, 2048, dtype=dtype)) for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(operands, float("inf"))
    for dtype, (a, b, out) in operands.items():
        torch.matmul(a, b, out=out)  # the library picks its kernel (and pages its code in) on the first call
    # the two alternate and write into buffers made above, so a stall or a reclaim under memory pressure hits both
    # arms alike (or only some of the tries) instead of biasing one: the best of each counts
    for _ in range(SPEEDUP_PROBE_TRIES):
        for dtype, (a, b, out) in operands.items():
            start = time.perf_counter()
            torch.matmul(a, b, out=out)
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


def attention_with_lse(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
    """Softmax attention (default 1/sqrt(C) scale) and each query's log-sum-exp of its scores, float32: the bfloat16
    products where keys and values are kept in bfloat16 on the CPU, else PyTorch's CPU flash kernel where it has one,
    else the same in plain tensor ops."""
    if keys.dtype == torch.bfloat16 and keys.device.type == "cpu":
        return bf16_attention_with_lse(queries, keys, values)
    kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if kernel is not None and queries.device.type == "cpu" and queries.dtype == torch.float32:
        out, lse = kernel(queries, keys, values)
        return out, lse
    scores = (queries.float() @ keys.float().transpose(-1, -2)) * queries.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    return (scores - lse[..., None]).exp_() @ values.float(), lse


def _attend_in_key_blocks(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          settings: _Settings) -> torch.Tensor:
    """softmax(Q K^T / sqrt(C)) V for (B, 1, N, C) queries/keys/values in spill files, holding one block of keys and
    values in RAM at a time: every query chunk attends to the block, and each chunk's result so far is merged with
    the block's by their log-sum-exp (exact up to float rounding). The result (float32) waits in a spill file, the
    log-sum-exps (4 bytes a position) in RAM; touched file pages go back to the kernel as the sweep goes."""
    b, _, n, c = keys.shape
    block = _key_block(n, c, keys.element_size())
    chunk = _query_chunk(block)
    out = settings.spill.empty((b, 1, n, c), torch.float32, channels_last=False)
    lse = torch.empty(b, 1, n, dtype=torch.float32)
    for start in range(0, n, block):
        settings.spill.will_need(keys[:, :, start:start + block])
        settings.spill.will_need(values[:, :, start:start + block])
        key_block = keys[:, :, start:start + block].clone()  # anonymous copies: the files' pages go back below
        value_block = values[:, :, start:start + block].clone()
        settings.spill.release()
        for i in range(0, n, chunk):
            settings.tick()
            settings.spill.will_need(queries[:, :, i:i + chunk])
            settings.spill.will_need(out[:, :, i:i + chunk], writing=not start)
            part, part_lse = attention_with_lse(queries[:, :, i:i + chunk].contiguous(), key_block, value_block)
            if start == 0:
                out[:, :, i:i + chunk] = part
                lse[:, :, i:i + chunk] = part_lse
            else:
                so_far = lse[:, :, i:i + chunk]
                merged = torch.logaddexp(so_far, part_lse)
                result = out[:, :, i:i + chunk]
                result.mul_((so_far - merged).exp_()[..., None]).add_(part.mul_((part_lse - merged).exp_()[..., None]))
                so_far.copy_(merged)
            settings.count()
            settings.touch(queries[:, :, i:i + chunk])
            settings.touch(out[:, :, i:i + chunk])
            settings.release_if_due()
    settings.spill.release()
    return out


def _local_windows(height: int, width: int):
    """Local attention's query blocks and the windows of keys they see: (rows, cols, window rows, window cols)."""
    for rows, cols in _tiles(height, width, LOCAL_ATTENTION_BLOCK):
        yield rows, cols, _grow(rows, LOCAL_ATTENTION_HALO, height)[0], _grow(cols, LOCAL_ATTENTION_HALO, width)[0]


def _query_chunk(keys: int) -> int:
    """Queries per attention call against `keys` keys."""
    return max(1, ATTENTION_SCORE_ELEMENTS // keys)


def _attention_units(h: int, w: int, c: int, settings: _Settings, dtype: torch.dtype | None = None) -> int:
    """Progress units of an attention step: its key/value tiles, then one per query chunk of each query tile (or of
    each key block's sweep, then the output tiles; key blocks of `dtype`, default the settings' attention dtype)."""
    side = _side(settings, c)
    if _streams_keys(settings):
        dtype = dtype or settings.attention_dtype or settings.dtype
        block = _key_block(h * w, c, torch.empty(0, dtype=dtype).element_size())
        sweeps = math.ceil(h * w / block) * math.ceil(h * w / _query_chunk(block))
        return 2 * _count(h, w, side) + sweeps
    if settings.local_attention:
        queries = [(rows, cols, (wr.stop - wr.start) * (wc.stop - wc.start)) for rows, cols, wr, wc in
                   _local_windows(h, w)]
    else:
        queries = [(rows, cols, h * w) for rows, cols in _tiles(h, w, side)]
    return _count(h, w, side) + sum(math.ceil((rows.stop - rows.start) * (cols.stop - cols.start) / _query_chunk(keys))
                                    for rows, cols, keys in queries)


def _positions(tile: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C): a view for channels_last tiles."""
    return tile.permute(0, 2, 3, 1).reshape(tile.shape[0], -1, tile.shape[1])


def _flat_index(rows: slice, cols: slice, width: int, device) -> torch.Tensor:
    r = torch.arange(rows.start, rows.stop, device=device)
    c = torch.arange(cols.start, cols.stop, device=device)
    return (r[:, None] * width + c[None, :]).flatten()


def _upsample(source: _Activation, module, settings: _Settings) -> _Activation:
    """Nearest 2x then a 3x3 conv: low-res tiles with a 1-px halo, output cropped by 2 px per halo pixel."""
    b, c, h, w = source.shape
    out = _Activation(b, module.conv.out_channels, h * 2, w * 2, settings)
    for rows, cols in _tiles(h, w, _side(settings, 4 * c)):
        settings.tick()
        grown_rows, top, bottom = _grow(rows, 1, h)
        grown_cols, left, right = _grow(cols, 1, w)
        computed = module(source.read(grown_rows, grown_cols, settings))
        margins = (2 * top, 2 * bottom, 2 * left, 2 * right)
        out.write(slice(rows.start * 2, rows.stop * 2), slice(cols.start * 2, cols.stop * 2), _crop(computed, *margins),
                  computed, margins)
        settings.advance()
    return out


def _downsample(source: _Activation, module, settings: _Settings) -> _Activation:
    """Pad right/bottom by one, 3x3 stride-2 conv: output rows [o0, o1) read input rows [2*o0, 2*o1 + 1)."""
    b, c, h, w = source.shape
    out_h, out_w = _downsampled(h, w)
    out = _Activation(b, module.conv.out_channels, out_h, out_w, settings)
    for rows, cols in _tiles(out_h, out_w, _side(settings, 4 * c)):
        settings.tick()
        in_rows = slice(2 * rows.start, min(h, 2 * rows.stop + 1))
        in_cols = slice(2 * cols.start, min(w, 2 * cols.stop + 1))
        # the padded input straight into scratch (the module's zero pad only where the tile meets it), then the
        # conv alone: no padded copy, and the output is exactly the tile
        padded = settings.scratch(0, (b, c, 2 * (rows.stop - rows.start) + 1, 2 * (cols.stop - cols.start) + 1))
        in_h, in_w = in_rows.stop - in_rows.start, in_cols.stop - in_cols.start
        region = source.data[:, :, in_rows, in_cols]
        settings.touch(region, ahead="read")
        padded[:, :, :in_h, :in_w].copy_(region)
        padded[:, :, in_h:].zero_()
        padded[:, :, :in_h, in_w:].zero_()
        out.write(rows, cols, module.conv(padded))
        settings.advance()
    return out


# ---------------------------------------------------------------------------------------------------------------
# the two networks


def _decoder_steps(model) -> list[tuple[str, object]]:
    """The decoder as a list of (kind, module), checked against the shapes this module can tile exactly."""
    decoder = getattr(model, "decoder", None)
    _require(decoder is not None and hasattr(decoder, "up") and hasattr(decoder, "mid"), "no decoder.up/mid")
    _require(not getattr(decoder, "give_pre_end", False) and not getattr(decoder, "tanh_out", False),
             "decoder.give_pre_end/tanh_out")
    _require(getattr(model, "bn", None) is None, "a batch-normalised latent")
    steps: list[tuple[str, object]] = []
    post = getattr(model, "post_quant_conv", None)
    if post is not None:
        _check_same_conv(post, "post_quant_conv")
        steps.append(("conv", post))
    _check_same_conv(decoder.conv_in, "decoder.conv_in")
    steps.append(("conv", decoder.conv_in))
    steps += _mid_steps(decoder.mid, "decoder.mid")
    for level in reversed(range(len(decoder.up))):
        up = decoder.up[level]
        steps += _level_steps(up, f"decoder.up[{level}]")
        if hasattr(up, "upsample"):
            _require(getattr(up.upsample, "with_conv", False) and _is_conv(up.upsample.conv, 3)
                     and getattr(up.upsample, "scale_factor", 2.0) in (2, 2.0), f"decoder.up[{level}].upsample")
            steps.append(("upsample", up.upsample))
    _check_norm(decoder.norm_out, "decoder.norm_out")
    _check_same_conv(decoder.conv_out, "decoder.conv_out")
    steps.append(("norm_conv", (decoder.norm_out, decoder.conv_out)))
    return steps


def _encoder_steps(model) -> list[tuple[str, object]]:
    """The encoder (and quant_conv) as a list of (kind, module)."""
    encoder = getattr(model, "encoder", None)
    _require(encoder is not None and hasattr(encoder, "down") and hasattr(encoder, "mid"), "no encoder.down/mid")
    regularization = getattr(model, "regularization", None)
    _require(regularization is not None and type(regularization).__name__ == "DiagonalGaussianRegularizer"
             and not getattr(regularization, "sample", False), "a latent regulariser other than the Gaussian mode")
    _require(getattr(model, "bn", None) is None, "a batch-normalised latent")
    _check_same_conv(encoder.conv_in, "encoder.conv_in")
    steps: list[tuple[str, object]] = [("conv", encoder.conv_in)]
    for level, down in enumerate(encoder.down):
        steps += _level_steps(down, f"encoder.down[{level}]")
        if hasattr(down, "downsample"):
            _require(getattr(down.downsample, "with_conv", False) and _is_conv(down.downsample.conv, 3, 2)
                     and tuple(down.downsample.conv.padding) == (0, 0), f"encoder.down[{level}].downsample")
            steps.append(("downsample", down.downsample))
    steps += _mid_steps(encoder.mid, "encoder.mid")
    _check_norm(encoder.norm_out, "encoder.norm_out")
    _check_same_conv(encoder.conv_out, "encoder.conv_out")
    steps.append(("norm_conv", (encoder.norm_out, encoder.conv_out)))
    quant = getattr(model, "quant_conv", None)
    if quant is not None:
        _check_same_conv(quant, "quant_conv")
        steps.append(("conv", quant))
    return steps


def _level_steps(level, name: str) -> list[tuple[str, object]]:
    """One resolution level's resnet blocks, each followed by its attention block where the level has them."""
    steps: list[tuple[str, object]] = []
    for i, block in enumerate(level.block):
        _check_resnet(block, f"{name}.block[{i}]")
        steps.append(("resnet", block))
        if len(level.attn) > 0:
            _check_attention(level.attn[i], f"{name}.attn[{i}]")
            steps.append(("attention", level.attn[i]))
    return steps


def _mid_steps(mid, name: str) -> list[tuple[str, object]]:
    _check_resnet(mid.block_1, f"{name}.block_1")
    _check_attention(mid.attn_1, f"{name}.attn_1")
    _check_resnet(mid.block_2, f"{name}.block_2")
    return [("resnet", mid.block_1), ("attention", mid.attn_1), ("resnet", mid.block_2)]


@dataclass(frozen=True)
class _Step:
    """How one kind of step runs, how many tiles it takes, and the (height, width, channels) it outputs."""
    run: Callable
    tiles: Callable
    output: Callable


def _resnet_tiles(h, w, c, block, settings):
    first = _count(h, w, _side(settings, max(block.in_channels, block.out_channels)))
    shortcut = _shortcut(block)
    return (first * (2 if shortcut is not None and _halo(shortcut) > 0 else 1)
            + _count(h, w, _side(settings, block.out_channels)))


def _downsampled(h: int, w: int) -> tuple[int, int]:
    return (h - 2) // 2 + 1, (w - 2) // 2 + 1  # the module's (0, 1, 0, 1) pad, then k3 s2


_STEPS = {
    "conv": _Step(run=lambda act, m, s: _conv(act, m, s),
                  tiles=lambda h, w, c, m, s: _count(h, w, _side(s, max(m.out_channels, m.in_channels))),
                  output=lambda h, w, c, m: (h, w, m.out_channels)),
    "resnet": _Step(run=lambda act, m, s: _resnet(act, m, s), tiles=_resnet_tiles,
                    output=lambda h, w, c, m: (h, w, m.out_channels)),
    "attention": _Step(run=lambda act, m, s: _attention(act, m, s),
                       tiles=lambda h, w, c, m, s: _attention_units(h, w, c, s),
                       output=lambda h, w, c, m: (h, w, c)),
    "upsample": _Step(run=lambda act, m, s: _upsample(act, m, s),
                      tiles=lambda h, w, c, m, s: _count(h, w, _side(s, 4 * c)),
                      output=lambda h, w, c, m: (2 * h, 2 * w, m.conv.out_channels)),
    "downsample": _Step(run=lambda act, m, s: _downsample(act, m, s),
                        tiles=lambda h, w, c, m, s: _count(*_downsampled(h, w), _side(s, 4 * c)),
                        output=lambda h, w, c, m: (*_downsampled(h, w), m.conv.out_channels)),
    "norm_conv": _Step(run=lambda act, m, s: _norm_conv(act, m[0], m[1], s),
                       tiles=lambda h, w, c, m, s: _count(h, w, _side(s, max(m[1].out_channels, m[1].in_channels))),
                       output=lambda h, w, c, m: (h, w, m[1].out_channels)),
}
"""Every kind of step `_decoder_steps`/`_encoder_steps` list, in one table: running, counting and sizing a network
all walk it."""


def _shapes(steps, height: int, width: int, channels: int):
    """(kind, module, input (h, w, c), output (h, w, c)) for every step, following the resolution through."""
    for kind, module in steps:
        out = _STEPS[kind].output(height, width, channels, module)
        yield kind, module, (height, width, channels), out
        height, width, channels = out


def _count_tiles(steps, height: int, width: int, channels: int, settings: _Settings) -> int:
    """Progress total: tiles of every layer, following the resolution through the network."""
    return sum(_STEPS[kind].tiles(*shape_in, module, settings)
               for kind, module, shape_in, _ in _shapes(steps, height, width, channels))


def _run(steps, tensor: torch.Tensor, settings: _Settings) -> torch.Tensor:
    settings.total = _count_tiles(steps, tensor.shape[2], tensor.shape[3], tensor.shape[1], settings)
    act = _Activation.of(tensor, settings)
    for kind, module in steps:
        act = _STEPS[kind].run(act, module, settings)
    if settings.spill is None:
        return act.data.to(torch.float32)
    result = torch.empty(act.shape, dtype=torch.float32, device=settings.device, memory_format=settings.memory_format)
    settings.spill.will_need(act.data)
    result.copy_(act.data)  # out of the spill file: the caller gets an ordinary tensor
    settings.spill.release()
    return result


def _tile_elements(tile_size: int | None) -> int:
    return DEFAULT_TILE_ELEMENTS if tile_size is None else 128 * tile_size * tile_size


def attention_dtype_for(device, dtype: torch.dtype, encode: bool = False) -> torch.dtype:
    """The dtype of the attention's keys, values and products for a run on `device` in `dtype`: bfloat16 for a
    float32 run on a CPU that multiplies bfloat16 `BF16_ATTENTION_MIN_SPEEDUP` times faster (an encode only with
    `ENCODER_BF16_ATTENTION`), else `dtype`."""
    if encode and not ENCODER_BF16_ATTENTION:
        return dtype
    if (torch.device(device).type == "cpu" and dtype == torch.float32
            and cpu_bf16_matmul_speedup() >= BF16_ATTENTION_MIN_SPEEDUP):
        return torch.bfloat16
    return dtype


def _settings(model, device, dtype, tile_size, storage_dtype, should_cancel, progress, spill=None,
              local_attention=False, attention_dtype=None, encode=False) -> _Settings:
    weight = next(model.parameters())
    device = torch.device(device) if device is not None else weight.device
    dtype = dtype or weight.dtype
    # channels_last on CPU: oneDNN's convs run 10-20% faster on it (whole decode ~10%), and ComfyUI's images are
    # (B, H, W, C), so the untiled encoder already runs channels_last. On CUDA (H200, bf16) the channels_last encode
    # measured 5.8x the untiled time at 2048 px where the channels-first decode ran 1.15x: channels-first there.
    channels_last = device.type == "cpu"
    if spill is not None and device.type != "cpu":
        raise ValueError("a SpillStore keeps activations in RAM-mapped files: use it with the CPU as the device")
    attention_dtype = attention_dtype or attention_dtype_for(device, dtype, encode)
    return _Settings(device, dtype, _tile_elements(tile_size), storage_dtype, should_cancel, progress,
                     channels_last, spill, local_attention, attention_dtype)


def _steps(first_stage_model, encode: bool):
    return _encoder_steps(first_stage_model) if encode else _decoder_steps(first_stage_model)


def stored_bytes(first_stage_model, shape, encode: bool) -> int:
    """About the most memory the stored activations take at once for input `shape` (B, C, H, W): the largest layer
    held twice (its input and output), in float16, plus the input; the tiles' own memory comes on top."""
    batch, channels, height, width = shape
    largest = channels * height * width
    for _, _, _, (h, w, c) in _shapes(_steps(first_stage_model, encode), height, width, channels):
        largest = max(largest, c * h * w)
    return batch * (2 * largest * 2 + channels * height * width * 4)


@dataclass(frozen=True)
class VAEMemory:
    """What one tiled encode/decode holds at its peak, in bytes, by kind (see `memory_needs`)."""
    activations: int
    """The full activations kept between layers (in RAM, or in the spill file when spilling)."""
    tiles: int
    """Tile buffers: the input and region scratch, conv outputs, the library's reorders."""
    attention: int
    """The mid-block self-attention's whole keys and values plus one chunk of scores."""
    result: int
    """The float32 result, and the float32 copy of the input the first layer reads."""
    sweep_file: int = 0
    """A spilled run's exact attention (the key-block sweep) in its files: the queries and the float32 result."""
    sweep_ram: int = 0
    """A spilled run's exact attention in RAM: one block of keys and values, and a log-sum-exp per position."""

    @property
    def in_ram(self) -> int:
        """RAM (or device memory) the run takes with its activations kept there."""
        return self.activations + self.tiles + self.attention + self.result

    @property
    def spilled_ram(self) -> int:
        """RAM the run takes with its activations, the attention's keys, values, queries and result in a `SpillStore`
        (the file pages a stretch of tiles touched, with the kernel's fault-around, count until they are handed back:
        up to twice `SPILL_RESIDENT_BYTES`)."""
        return self.tiles + ATTENTION_SCORE_ELEMENTS * 4 + self.sweep_ram + self.result + 2 * SPILL_RESIDENT_BYTES

    @property
    def spill_file(self) -> int:
        """File space a spilled run takes: its activations (float16, or the half compute dtype), the attention's
        keys and values, and its sweep's queries and result. A float32 run whose values leave float16's range needs
        up to twice the activations; the store reserves each file's blocks when it makes it, so a full disk is an
        OSError there, never a crash."""
        return self.activations + self.attention + self.sweep_file


def memory_needs(first_stage_model, shape, encode: bool, tile_size: int | None = None,
                 dtype: torch.dtype = torch.float32) -> VAEMemory:
    """The memory a `tiled_encode`/`tiled_decode` of input `shape` (B, C, H, W) takes, by kind: the model of it the
    callers plan with (the nodes refuse or pick the spill path from it)."""
    steps = _steps(first_stage_model, encode)
    batch, channels, height, width = shape
    size = torch.empty(0, dtype=dtype).element_size()
    attention = sweep_file = sweep_ram = 0
    for kind, _, (h, w, c), (out_h, out_w, out_c) in _shapes(steps, height, width, channels):
        if kind == "attention":
            attention = max(attention, 2 * batch * h * w * c * size + ATTENTION_SCORE_ELEMENTS * 4)
            sweep_file = max(sweep_file, batch * h * w * c * (size + 4))
            sweep_ram = max(sweep_ram, batch * _key_block(h * w, c, size) * 2 * c * size + batch * h * w * 4)
        last = out_h, out_w, out_c
    result = batch * (last[0] * last[1] * last[2] + channels * height * width) * 4
    largest_layer = max(c * h * w for _, _, _, (h, w, c) in _shapes(steps, height, width, channels))
    return VAEMemory(activations=stored_bytes(first_stage_model, shape, encode),
                     tiles=TILE_COPIES * min(_tile_elements(tile_size), batch * largest_layer) * max(4, size),
                     attention=attention, result=result, sweep_file=sweep_file, sweep_ram=sweep_ram)


def check_vae(first_stage_model) -> None:
    """Raise UnsupportedVAE unless both the encoder and the decoder can be tiled exactly."""
    _decoder_steps(first_stage_model)
    _encoder_steps(first_stage_model)


@torch.no_grad()
def tiled_decode(first_stage_model, latent: torch.Tensor, tile_size: int | None = None,
                 device=None, dtype: torch.dtype | None = None, storage_dtype: torch.dtype | None = None,
                 should_cancel: Callable[[], bool] | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 spill: SpillStore | None = None, local_attention: bool = False,
                 attention_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode latent (B, C, h, w) like `first_stage_model.decode`, exactly, in tiles; returns float32 (B, 3, H, W)
    in the model's output range (-1..1 for SD; apply the host VAE's `process_output`).

    `tile_size` (pixels at the full-resolution layers; deeper layers use the same element budget) bounds the
    per-tile memory; `storage_dtype` forces the between-layer storage (default: the compute dtype when that is
    bfloat16/float16; for float32, float32 when small, float16 when finite, float32 otherwise). `should_cancel()`
    is asked before every tile of every layer. `spill` keeps the full activations between layers in its files
    instead of RAM (CPU runs; same result; see `memory_needs` for what each way holds). `local_attention` trades
    exactness for speed in the mid-block attention: each 512 px block of queries attends to the 1024 px window
    around it instead of the whole image (`LOCAL_ATTENTION_HALO`; same memory), the rest stays exact.
    `attention_dtype` forces the dtype of the attention's keys, values and products (default:
    `attention_dtype_for`, bfloat16 products for float32 runs on CPUs fast at them).
    """
    settings = _settings(first_stage_model, device, dtype, tile_size, storage_dtype, should_cancel, progress, spill,
                         local_attention, attention_dtype)
    return _run(_decoder_steps(first_stage_model), latent, settings)


@torch.no_grad()
def tiled_encode(first_stage_model, pixels: torch.Tensor, tile_size: int | None = None,
                 device=None, dtype: torch.dtype | None = None, storage_dtype: torch.dtype | None = None,
                 should_cancel: Callable[[], bool] | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 spill: SpillStore | None = None, local_attention: bool = False,
                 attention_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Encode pixels (B, 3, H, W), already in the model's input range (the host VAE's `process_input`), like
    `first_stage_model.encode` (the Gaussian's mode), exactly, in tiles; returns float32 (B, C, H/8, W/8).
    The keyword arguments are those of `tiled_decode`, but `attention_dtype` defaults to the encoder's
    (`attention_dtype_for` with `encode`: the run's dtype, `ENCODER_BF16_ATTENTION`)."""
    settings = _settings(first_stage_model, device, dtype, tile_size, storage_dtype, should_cancel, progress, spill,
                         local_attention, attention_dtype, encode=True)
    moments = _run(_encoder_steps(first_stage_model), pixels, settings)
    return moments[:, :moments.shape[1] // 2]

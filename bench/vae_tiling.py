#!/usr/bin/env python3
"""Tiled VAE figures: untiled vs the host's tiled VAE vs ours (nodes/core/tiled_vae.py), decode and encode.

    VENV/bin/python bench/vae_tiling.py [--sizes 512 1024] [--full] [--checkpoint CKPT] [--tile 512 --overlap 64]
                                        [--device auto|cpu|cuda] [--td-folder PATH/ComfyUI-TiledDiffusion]

Every case runs in its own process (the VAE loaded alone, weights loaded before measuring): wall time, peak
memory above the loaded-VAE baseline, and max/mean abs difference to the untiled result (pixels 0..1 for decode,
latent units for encode). Without --checkpoint the VAE is the SD VAE architecture with seeded random weights,
loaded through ComfyUI's own `comfy.sd.VAE`. --full adds 2048 px (untiled needs ~18 GB: run it alone on the
machine). Also prints the UNet work amplification of the default MultiDiffusion plan. Timings on a shared machine
are noisy: compare ratios within one run.

CPU (no CUDA, or --device cpu): peak = resident memory (Linux VmHWM reset through /proc/self/clear_refs); no
warm-up run, so figures stay comparable with docs/performance.md. --threads sets torch's CPU threads.
CUDA (default when torch sees a GPU): the VAE, ours and the host's paths all run on the GPU (`vae.device`);
outputs land where the host puts them (its intermediate device, the CPU) in every mode. Each case first runs once
untimed at 256 px in the same process (CUDA context, cuDNN/cuBLAS lazy init), then the clock runs from a
synchronize to a synchronize; peak = torch.cuda.max_memory_allocated() above the memory allocated with the VAE
loaded (peak stats reset just before). The header names the card and torch version; the VAE's dtype is ComfyUI's
choice (bf16 on recent cards) unless --vae-dtype says otherwise.

`ours` runs the way the nodes plan it (`host_vae.plan`: activations in RAM while the working memory takes at most
2 GB, else spilled to a temporary file; the row names the way); `ours-ram` and `ours-spill` (only when asked for with
--modes) force one way; `ours-spill-keys-whole` (only when asked for) is `ours-spill` with the exact attention's keys
and values read whole by every query chunk, as before the key-block sweep (for the side-by-side); `ours-local` (only
when asked for) runs the planned way with the opt-in local attention (vae_attention=local: each 512 px block attends
to the 1024 px around it; not exact); `ours-bf16-attention` (only when asked for) forces the bfloat16 attention
products (the encoder's default before `tiled_vae.ENCODER_BF16_ATTENTION`). CPU rows also give the peak RssAnon
(sampled every 20 ms): resident memory without mapped file pages, i.e. without the spill file's pages, which the
kernel may write out and drop at any time.

`td`: TiledDiffusion's Tiled VAE (github.com/shiimizu/ComfyUI-TiledDiffusion, tiled_vae.py), a comparison only.
Its licence forbids commercial use, so it is never copied into this repo or imported by the pack: the case process
loads tiled_vae.py at run time from --td-folder (as a private package `_td_bench`, its __init__ not run), then does
what its nodes' `TiledVAE.process` does: sets its `devices.device = vae.device`, wraps
`first_stage_model.decoder` (or `.encoder`) forward with its `VAEHook`, calls the host's untiled `vae.decode` /
`vae.encode` under its `devices.without_autocast()`, and restores the forward. Settings: its nodes' defaults
except the tile: fast=True (GroupNorm statistics estimated on a downscaled copy; --td-fast off uses its exact
statistics pass), color_fix=True for encode (its encode node's default; its decode node has none),
to_gpu = (ComfyUI's vae_device is not the CPU); tile_size = our --tile in its node's units (decode: --tile // 8
latent px, encode: --tile px), each tile then padded by its fixed 11 latent px (decode) / 32 px (encode) per side.
Its nodes default to a GPU-memory-dependent tile (decode 512 px on CPU to 2048 px on >30 GB cards, encode 512 px
on CPU to 3072 px on >16 GB cards) and allow no less than 384 px (decode) / 256 px (encode); VAEHook itself takes
any tile, so a smaller --tile still runs. Its own wrapper resets CUDA peak stats inside the call; the bench
disables that reset during the call so the td peak covers the whole `vae.decode`/`vae.encode` like the others."""
import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import torch

PACK_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_COMFY = os.environ.get("COMFYUI_PATH", str(Path.home() / ".cache/comfyui-astria/host-0.3.75/ComfyUI"))
"""The ComfyUI tree the benches import: COMFYUI_PATH, else the one ./scripts/test builds."""
MODES = ["untiled", "host", "ours", "ours-ram", "ours-spill", "ours-spill-keys-whole", "ours-local",
         "ours-bf16-attention", "td"]
WARMUP_SIZE = 256
TD_PACKAGE = "_td_bench"  # private name: TiledDiffusion's folder never becomes an importable top-level package


def import_pack():
    """Load the pack under its alias without putting the repo root on sys.path (ComfyUI has its own `nodes`)."""
    sys.path.insert(0, str(PACK_ROOT / "tests"))
    import conftest  # noqa: F401  (registers `comfyui_astria`)
    sys.path.pop(0)


def import_comfy(comfy_path: str, device: str) -> None:
    """Put ComfyUI on sys.path and pin its device: CPU unless `device` is cuda (then its default, the GPU)."""
    if not os.path.isfile(os.path.join(comfy_path, "comfy", "sd.py")):
        sys.exit(f"error: {comfy_path} is not a ComfyUI tree; pass --comfy or set COMFYUI_PATH")
    sys.path.insert(0, comfy_path)
    import comfy.cli_args
    if device != "cuda":
        comfy.cli_args.args.cpu = True


def start_cpu_host(comfy_path: str, threads: int) -> None:
    """The CPU benches' common start: torch's thread count, ComfyUI imported on the CPU, the pack imported."""
    torch.set_num_threads(threads)
    import_comfy(comfy_path, "cpu")
    import_pack()


def resolve_device(requested: str) -> str:
    """'cuda' or 'cpu' for --device auto|cpu|cuda; exits with a sentence when cuda is asked for but absent."""
    if requested == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False); "
                 "run on a GPU machine or use --device cpu")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


_libc = ctypes.CDLL("libc.so.6")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(fn, cuda: bool):
    """fn() -> (result, seconds, peak extra MiB, peak extra RssAnon MiB): GPU memory allocated above the allocation
    just before on CUDA (RssAnon 0), resident memory above the resident size just before on CPU."""
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        return out, seconds, (torch.cuda.max_memory_allocated() - base) / 2**20, 0.0
    _libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0, anon0 = _status_kib("VmRSS"), _status_kib("RssAnon")
    anon_peak = [anon0]
    done = threading.Event()

    def sample():
        while not done.wait(0.02):
            anon_peak[0] = max(anon_peak[0], _status_kib("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    anon_peak[0] = max(anon_peak[0], _status_kib("RssAnon"))
    return out, seconds, (_status_kib("VmHWM") - rss0) / 1024, (anon_peak[0] - anon0) / 1024


def write_random_vae(path: Path, seed: int) -> None:
    """The SD VAE with seeded random weights (tests/support/random_vae.py), saved as a state dict."""
    from safetensors.torch import save_file

    import_pack()
    from comfyui_astria.tests.support.random_vae import random_vae
    model = random_vae(seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def load_vae(args):
    import comfy.cli_args
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    if args.vae_dtype != "auto":  # read by comfy.model_management.vae_dtype() when the VAE is built
        setattr(comfy.cli_args.args, f"{args.vae_dtype}_vae", True)
    if args.checkpoint:
        _, _, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=False,
                                                             output_model=False)
    else:
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(args.vae_file))
    mm.load_models_gpu([vae.patcher])
    return vae


def inputs(size: int, seed: int):
    """Decode input: a seeded N(0,1) latent; encode input: a smooth seeded image (B, H, W, 3) in 0..1."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn((1, 4, size // 8, size // 8), generator=gen)
    coarse = torch.rand((1, 3, size // 32, size // 32), generator=gen)
    image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1)
    return latent, image.movedim(1, -1).contiguous()


def load_tiled_diffusion(folder: str):
    """TiledDiffusion's tiled_vae module from a ComfyUI-TiledDiffusion checkout, loaded at run time only.

    The folder becomes the private package `_td_bench` (so sibling imports resolve) without running its
    __init__.py, which would also import its tiled diffusion and patch ComfyUI's samplers."""
    path = Path(folder).expanduser().resolve() / "tiled_vae.py"
    if not path.is_file():
        raise FileNotFoundError(f"no tiled_vae.py in {folder}; pass a ComfyUI-TiledDiffusion checkout as --td-folder")
    package = types.ModuleType(TD_PACKAGE)
    package.__path__ = [str(path.parent)]
    sys.modules[TD_PACKAGE] = package
    spec = importlib.util.spec_from_file_location(f"{TD_PACKAGE}.tiled_vae", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _keep_cuda_peak_stats():
    """TiledDiffusion's timing wrapper resets CUDA peak stats; keep ours running through its call."""
    reset = torch.cuda.reset_peak_memory_stats
    torch.cuda.reset_peak_memory_stats = lambda device=None: None
    try:
        yield
    finally:
        torch.cuda.reset_peak_memory_stats = reset


def td_run(td, vae, op: str, tile: int, fast: bool, x):
    """Decode latent / encode image `x` through the host's untiled vae.decode/encode with TiledDiffusion's VAEHook
    on the decoder/encoder forward, as its TiledVAE.process node does (settings: module docstring)."""
    import comfy.model_management as mm
    is_decoder = op == "decode"
    td.devices.device = vae.device
    net = vae.first_stage_model.decoder if is_decoder else vae.first_stage_model.encoder
    hook = td.VAEHook(net=net, tile_size=tile // 8 if is_decoder else tile, is_decoder=is_decoder,
                      fast_decoder=fast, fast_encoder=fast, color_fix=not is_decoder,
                      to_gpu=mm.vae_device().type != "cpu")
    saved = net.__dict__.get("forward")
    net.forward = hook
    try:
        with td.devices.without_autocast(), _keep_cuda_peak_stats():
            return vae.decode(x) if is_decoder else vae.encode(x)
    finally:
        hook.net = None
        if saved is None:
            del net.forward
        else:
            net.forward = saved


def make_cases(args, vae, tiled_vae, td, latent, image, ways=None):
    """(op, mode) -> a no-argument callable that returns the result on the host's output device; the ours modes
    record the way they ran in `ways`."""
    from comfyui_astria.nodes.comfy import host_vae
    ways = {} if ways is None else ways
    ratio = vae.spacial_compression_decode()
    lt, lo = args.tile // ratio, args.overlap // ratio
    model = vae.first_stage_model

    def way(mode, shape, encode):
        if mode == "ours-local":
            return host_vae.plan(vae, shape, encode, args.tile, local_attention=True).way + " local attention"
        if mode in ("ours-spill", "ours-spill-keys-whole"):
            return "spill"
        if mode == "ours-ram" or vae.device.type != "cpu":
            return "ram"
        return host_vae.plan(vae, shape, encode, args.tile).way

    def store(chosen):
        return tiled_vae.SpillStore() if chosen.startswith("spill") else None

    def keys_whole(mode):
        if mode == "ours-spill-keys-whole":  # the attention as before the key-block sweep
            tiled_vae._streams_keys = lambda settings: False

    def ours_decode(mode):
        keys_whole(mode)
        chosen = ways[mode] = way(mode, tuple(latent.shape), False)
        bf16 = torch.bfloat16 if mode == "ours-bf16-attention" else None
        raw = tiled_vae.tiled_decode(model, latent.to(vae.vae_dtype), tile_size=args.tile, device=vae.device,
                                     spill=store(chosen), local_attention=mode == "ours-local", attention_dtype=bf16)
        return vae.process_output(raw).movedim(1, -1).to(vae.output_device)

    def ours_encode(mode):
        keys_whole(mode)
        pixels = vae.process_input(vae.vae_encode_crop_pixels(image).movedim(-1, 1))
        chosen = ways[mode] = way(mode, tuple(pixels.shape), True)
        bf16 = torch.bfloat16 if mode == "ours-bf16-attention" else None  # as the decoder takes them on fast CPUs
        out = tiled_vae.tiled_encode(model, pixels.to(vae.vae_dtype), tile_size=args.tile, device=vae.device,
                                     spill=store(chosen), local_attention=mode == "ours-local", attention_dtype=bf16)
        return out.to(vae.output_device)

    fast = args.td_fast == "on"
    return {
        ("decode", "untiled"): lambda: vae.decode(latent),
        ("decode", "host"): lambda: vae.decode_tiled(latent, tile_x=lt, tile_y=lt, overlap=lo),
        ("decode", "ours"): lambda: ours_decode("ours"),
        ("decode", "ours-ram"): lambda: ours_decode("ours-ram"),
        ("decode", "ours-spill"): lambda: ours_decode("ours-spill"),
        ("decode", "ours-spill-keys-whole"): lambda: ours_decode("ours-spill-keys-whole"),
        ("decode", "ours-local"): lambda: ours_decode("ours-local"),
        ("decode", "ours-bf16-attention"): lambda: ours_decode("ours-bf16-attention"),
        ("decode", "td"): lambda: td_run(td, vae, "decode", args.tile, fast, latent),
        ("encode", "untiled"): lambda: vae.encode(image),
        ("encode", "host"): lambda: vae.encode_tiled(image, tile_x=args.tile, tile_y=args.tile, overlap=args.overlap),
        ("encode", "ours"): lambda: ours_encode("ours"),
        ("encode", "ours-ram"): lambda: ours_encode("ours-ram"),
        ("encode", "ours-spill"): lambda: ours_encode("ours-spill"),
        ("encode", "ours-spill-keys-whole"): lambda: ours_encode("ours-spill-keys-whole"),
        ("encode", "ours-local"): lambda: ours_encode("ours-local"),
        ("encode", "ours-bf16-attention"): lambda: ours_encode("ours-bf16-attention"),
        ("encode", "td"): lambda: td_run(td, vae, "encode", args.tile, fast, image),
    }


def run_case(args) -> None:
    """One measurement in this process; prints a JSON row and saves the output for the diff."""
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if args.mode == "host" and 2 * args.overlap >= args.tile:
        sys.exit(f"host tiled needs --overlap below --tile / 2 (its extra passes use half-width tiles); "
                 f"got --tile {args.tile} --overlap {args.overlap}")
    import_comfy(args.comfy, args.device)
    import_pack()
    from comfyui_astria.nodes.core import tiled_vae
    td = None
    if args.mode == "td":
        try:
            td = load_tiled_diffusion(args.td_folder)
        except Exception as e:  # any failure of foreign code: one line for the table, not a traceback
            sys.exit(f"could not load TiledDiffusion from {args.td_folder}: {type(e).__name__}: {e}")
    vae = load_vae(args)
    with torch.inference_mode():  # as ComfyUI runs nodes; the host's encode_tiled needs it
        if cuda:  # untimed warm-up of the same case: CUDA/cuDNN/cuBLAS lazy init is not counted
            small = make_cases(args, vae, tiled_vae, td, *inputs(min(WARMUP_SIZE, args.size), args.seed))
            small[(args.op, args.mode)]()
            del small
        ways = {}
        cases = make_cases(args, vae, tiled_vae, td, *inputs(args.size, args.seed), ways=ways)
        out, seconds, peak, anon = measure(cases[(args.op, args.mode)], cuda)
    if args.size <= args.save_up_to:
        torch.save(out.float().cpu(), args.out)
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "anon_mib": anon, "way": ways.get(args.mode, ""),
                      "dtype": str(vae.vae_dtype).removeprefix("torch."), "device": str(vae.device)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", default=DEFAULT_COMFY)
    ap.add_argument("--checkpoint", help="a checkpoint ComfyUI loads; default: a random-weight SD VAE")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--full", action="store_true", help="add 2048 px (untiled needs ~18 GB of RAM)")
    ap.add_argument("--ops", nargs="+", choices=["decode", "encode"], default=["decode", "encode"])
    ap.add_argument("--modes", nargs="+", choices=MODES,
                    help="default: untiled host ours, and td when --td-folder is given")
    ap.add_argument("--tile", type=int, default=512, help="tile side in pixels (the host node's default 512)")
    ap.add_argument("--overlap", type=int, default=64, help="overlap in pixels (host only; ours needs none)")
    ap.add_argument("--td-folder", help="a ComfyUI-TiledDiffusion checkout: adds mode td (loaded at run time only)")
    ap.add_argument("--td-fast", choices=["on", "off"], default="on",
                    help="TiledDiffusion's fast mode (its nodes' default on: estimated GroupNorm statistics)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: cuda when torch sees a GPU, else cpu")
    ap.add_argument("--vae-dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                    help="auto: ComfyUI's choice for the device")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-up-to", type=int, default=2048,
                    help="outputs above this size are not saved for the diff (no untiled reference fits there)")
    ap.add_argument("--memory-model", action="store_true",
                    help="only print the memory model (tiled_vae.memory_needs) of the SD VAE at --tile, 1024-8192 px")
    ap.add_argument("--case", nargs=3, metavar=("OP", "MODE", "SIZE"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--vae-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.device = resolve_device(args.device)
    if args.case:
        args.op, args.mode, args.size = args.case[0], args.case[1], int(args.case[2])
        run_case(args)
        return
    if args.memory_model:
        print_memory_model(args)
        return
    if args.modes is None:
        args.modes = ["untiled", "host", "ours"] + (["td"] if args.td_folder else [])
    if "td" in args.modes and not args.td_folder:
        ap.error("mode td needs --td-folder PATH (a ComfyUI-TiledDiffusion checkout; it is never bundled)")
    print_amplification()
    sizes = args.sizes + ([2048] if args.full and 2048 not in args.sizes else [])
    cuda = args.device == "cuda"
    with tempfile.TemporaryDirectory(prefix="astria-vae-bench-") as tmp:
        if not args.checkpoint:
            import_comfy(args.comfy, args.device)
            args.vae_file = str(Path(tmp) / "sd_vae_random.safetensors")
            write_random_vae(Path(args.vae_file), args.seed)
        where = (f"CUDA {torch.cuda.get_device_name()}, warm-up {WARMUP_SIZE} px" if cuda
                 else f"CPU, {args.threads} threads")
        td = f", td fast={args.td_fast} from {args.td_folder}" if "td" in args.modes else ""
        print(f"{where}, torch {torch.__version__}, tile {args.tile} px, host overlap {args.overlap} px{td}, "
              f"VAE: {args.checkpoint or 'SD VAE, random weights'}", flush=True)
        peak = "peak GPU MiB" if cuda else "peak MiB"
        print(f"{'op':7} {'size':>5} {'mode':10} {'seconds':>8} {'x untiled':>9} {peak:>12} {'x untiled':>9} "
              f"{'RssAnon':>8} {'max abs':>9} {'mean abs':>9}  dtype way", flush=True)
        for size in sizes:
            for op in args.ops:
                bench_op(args, tmp, op, size)


def bench_op(args, tmp: str, op: str, size: int) -> None:
    rows = {}
    for mode in args.modes:
        out = Path(tmp) / f"{op}-{mode}-{size}.pt"
        cmd = [sys.executable, __file__, "--case", op, mode, str(size), "--out", str(out), "--comfy", args.comfy,
               "--threads", str(args.threads), "--tile", str(args.tile), "--overlap", str(args.overlap),
               "--seed", str(args.seed), "--device", args.device, "--vae-dtype", args.vae_dtype,
               "--td-fast", args.td_fast, "--save-up-to", str(args.save_up_to)]
        cmd += ["--checkpoint", args.checkpoint] if args.checkpoint else ["--vae-file", args.vae_file]
        cmd += ["--td-folder", args.td_folder] if args.td_folder else []
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            print(f"{op:7} {size:5} {mode:10} failed: {last}", flush=True)
            continue
        rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        rows[mode]["out"] = out
    base = rows.get("untiled")
    reference = torch.load(base["out"]) if base else None
    for mode, row in rows.items():
        time_ratio = f"{row['seconds'] / base['seconds']:.2f}" if base else "-"
        mem_ratio = f"{row['peak_mib'] / max(base['peak_mib'], 1):.2f}" if base else "-"
        if reference is not None and row["out"].exists():
            d = (torch.load(row["out"]) - reference).abs()
            diffs = f"{d.max().item():9.2e} {d.mean().item():9.2e}"
        else:
            diffs = f"{'-':>9} {'-':>9}"
        print(f"{op:7} {size:5} {mode:10} {row['seconds']:8.2f} {time_ratio:>9} {row['peak_mib']:12.0f} "
              f"{mem_ratio:>9} {row['anon_mib']:8.0f} {diffs}  {row['dtype']} {row['way']}", flush=True)


def print_memory_model(args) -> None:
    """The tiled VAE's memory model (`tiled_vae.memory_needs`, float32) by kind, as docs/performance.md tabulates it."""
    import_comfy(args.comfy, "cpu")
    import_pack()
    from comfyui_astria.nodes.core import tiled_vae
    from comfyui_astria.tests.support.random_vae import random_vae
    model = random_vae(0)
    print(f"| op | size | activations | tiles | attention K/V + scores | result + input | in RAM | spilled: RAM | "
          f"spill file |  (tile {args.tile} px)")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in (1024, 2048, 4096, 6144, 8192):
        for op in ("decode", "encode"):
            shape = (1, 3, size, size) if op == "encode" else (1, 4, size // 8, size // 8)
            needs = tiled_vae.memory_needs(model, shape, op == "encode", args.tile)
            cells = (needs.activations, needs.tiles, needs.attention, needs.result, needs.in_ram, needs.spilled_ram,
                     needs.spill_file)
            print(f"| {op} | {size} | " + " | ".join(f"{cell / 2**30:.2f} GiB" for cell in cells) + " |")


def print_amplification() -> None:
    """UNet work of the default MultiDiffusion plan: sum of tile areas per step / latent area."""
    import_pack()
    from comfyui_astria.nodes.core.tiling import DEFAULT_OVERLAP, DEFAULT_TILE_SIZE, latent_tile_plan
    print(f"MultiDiffusion, default tile {DEFAULT_TILE_SIZE} px, overlap {DEFAULT_OVERLAP} px:")
    for px in (1024, 1536, 2048, 3072, 4096):
        plan = latent_tile_plan(px // 8, px // 8)
        print(f"  {px:5} px: {len(plan):3} tiles, sides {sorted(set(plan.rows.sizes))} latent px, "
              f"UNet work x{plan.amplification:.3f}")


if __name__ == "__main__":
    main()

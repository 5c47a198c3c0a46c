"""Only-upscale benchmark: Astria Only Upscale (from prompt) vs the same job wired from ComfyUI's built-in nodes.

Each graph runs in its own fresh ComfyUI process (main.py --cpu or on the GPU with --gpu), side by side in one run on
the same machine, on the generated tiny SD1.5-layout checkpoint (random weights, full-size VAE and CLIP, so VAE and
text-encoder costs are real; the UNet is small). Prints wall time of the queued graph, the server's peak RSS above
its idle baseline, and the sampler steps run, then the ratios ours / built-ins. Never asserts.

Usage: ASTRIA_CACHE=... python bench/only_upscale.py [--sizes 256 512] [--gpu] [--json out.json]
(run with the host's python: $ASTRIA_CACHE/host-0.3.75/venv/bin/python, or through ./scripts/test's environment)
"""
import argparse
import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("astria_test_paths", PACK_ROOT / "tests" / "support" / "paths.py")
paths = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paths)  # where the host and the generated models are, as the tests find them
CACHE, COMFY_DIR, MODELS_DIR = paths.CACHE, paths.COMFY_DIR, paths.MODELS_DIR
CHECKPOINT = "tiny_sd15.safetensors"
POSITIVE = "masterpiece, best quality, highres"
NEGATIVE = "(worst quality, low quality, normal quality:2)"
# The docs' example with a fixed seed, without the embedding name and use_lpw, so both graphs encode the same text.
PROMPT = paths.pack_module("nodes/core/spec_tables.py").docs_example(seed="42", negative_prompt=NEGATIVE, use_lpw=None)


def free_port():
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_bytes(pid, field="VmRSS"):
    """Resident memory of a process and its children (Linux /proc): VmRSS, or RssAnon (without mapped file pages,
    such as the tiled VAE's spill file, which the kernel can write out and drop)."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(child) for child in children]
    except OSError:
        pass
    for one in pids:
        try:
            match = re.search(field + r":\s+(\d+) kB", Path(f"/proc/{one}/status").read_text())
            total += int(match.group(1)) * 1024 if match else 0
        except OSError:
            pass
    return total


def memory_bound(size):
    """The issue's bound above the idle server: the checkpoint's weights + 4 float32 RGB images at the output size +
    2 GiB."""
    out = 2 * size
    return (MODELS_DIR / "checkpoints" / CHECKPOINT).stat().st_size + 4 * out * out * 3 * 4 + 2 * 2**30


def torch_reserved(url):
    """GPU memory torch holds in the server (its /system_stats torch_vram_total), sampled; 0 if unreadable."""
    try:
        stats = json.loads(urllib.request.urlopen(url + "/system_stats", timeout=2).read())
        return int(stats["devices"][0].get("torch_vram_total", 0))
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def builtin_graph(image_name):
    """ImageScaleBy -> VAEEncodeTiled -> KSampler (16 steps, denoise 0.1) -> VAEDecodeTiled, the usual wiring."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                     "lora_name": "tiny_sd15_lora.safetensors",
                                                     "strength_model": 1.5, "strength_clip": 1.5}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": POSITIVE}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": NEGATIVE}},
        "5": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "6": {"class_type": "ImageScaleBy", "inputs": {"image": ["5", 0], "upscale_method": "lanczos",
                                                       "scale_by": 2.0}},
        "7": {"class_type": "VAEEncodeTiled", "inputs": {"pixels": ["6", 0], "vae": ["1", 2], "tile_size": 512,
                                                         "overlap": 64, "temporal_size": 64,
                                                         "temporal_overlap": 8}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["7", 0], "seed": 42, "steps": 16, "cfg": 6.0,
                                                   "sampler_name": "euler_ancestral", "scheduler": "normal",
                                                   "denoise": 0.1}},
        "9": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["8", 0], "vae": ["1", 2], "tile_size": 512,
                                                         "overlap": 64, "temporal_size": 64, "temporal_overlap": 8}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "bench_builtin"}},
    }


OUR_TILE_PX = 768  # the node's default
USDU_TILE_PX = 512  # UltimateSDUpscale's default tile


def usdu_graph(image_name):
    """UltimateSDUpscale as its users wire it: Lanczos 2x, then UltimateSDUpscaleNoUpscale with its defaults (512 px
    tiles, 32 padding, mask blur 8, Linear, no seam fix, uniform tiles) and the docs' example settings (16 steps,
    denoise 0.1, cfg 6, euler_ancestral); the same LoRA strength as the built-ins graph."""
    graph = builtin_graph(image_name)
    for key in ("7", "8", "9"):
        del graph[key]
    graph["8"] = {"class_type": "UltimateSDUpscaleNoUpscale", "inputs": {
        "upscaled_image": ["6", 0], "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "vae": ["1", 2],
        "seed": 42, "steps": 16, "cfg": 6.0, "sampler_name": "euler_ancestral", "scheduler": "normal",
        "denoise": 0.1, "mode_type": "Linear", "tile_width": USDU_TILE_PX, "tile_height": USDU_TILE_PX,
        "mask_blur": 8, "tile_padding": 32, "seam_fix_mode": "None", "seam_fix_denoise": 1.0, "seam_fix_width": 64,
        "seam_fix_mask_blur": 8, "seam_fix_padding": 16, "force_uniform_tiles": True, "tiled_decode": False,
        "batch_size": 1}}
    graph["10"]["inputs"] = {"images": ["8", 0], "filename_prefix": "bench_usdu"}
    return graph


def astria_comfyui_graph(image_name):
    """Ours with step_semantics=comfyui: all 16 steps on KSampler's shortened schedule (UltimateSDUpscale's work)."""
    graph = astria_graph(image_name)
    graph["6"]["inputs"]["step_semantics"] = "comfyui"
    return graph


def astria_local_graph(image_name):
    """Ours with step_semantics=comfyui and vae_attention=local (the opt-in, inexact VAE attention)."""
    graph = astria_comfyui_graph(image_name)
    graph["6"]["inputs"]["vae_attention"] = "local"
    return graph


def pixel_difference(path_a, path_b):
    """(max abs, mean abs) between two saved images, in 0-1 pixels (nan when either is missing)."""
    import numpy as np
    from PIL import Image

    if not (path_a and path_b):
        return float("nan"), float("nan")
    with Image.open(path_a) as a, Image.open(path_b) as b:
        diff = np.abs(np.asarray(a.convert("RGB"), np.float64) - np.asarray(b.convert("RGB"), np.float64)) / 255
    return float(diff.max()), float(diff.mean())


def seam_ratio(path, grid):
    """Mean |step| across the lines every `grid` px (UltimateSDUpscale's tile borders) over the mean |step| across
    all other lines, rows and columns together, on 0-1 pixels: 1.0 is no visible border."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    steps_x = np.abs(np.diff(pixels, axis=1)).mean(axis=(0, 2))  # step between column c and c + 1
    steps_y = np.abs(np.diff(pixels, axis=0)).mean(axis=(1, 2))
    at, rest = [], []
    for steps in (steps_x, steps_y):
        border = np.zeros(len(steps), bool)
        border[grid - 1::grid] = True
        at.append(steps[border])
        rest.append(steps[~border])
    at, rest = np.concatenate(at), np.concatenate(rest)
    return float(at.mean() / max(rest.mean(), 1e-12)) if at.size else float("nan")


def astria_graph(image_name):
    """LoadImage -> Astria Prompt -> Astria Only Upscale (from prompt) -> SaveImage."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "AstriaPrompt", "inputs": {"text": PROMPT}},
        "5": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "6": {"class_type": "AstriaOnlyUpscaleFromPrompt", "inputs": {
            "image": ["5", 0], "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "astria_prompt": ["2", 0],
            "scale": 2.0, "width": 0, "height": 0, "steps": 16, "denoise": 0.1, "cfg": 6.0,
            "sampler_name": "euler_ancestral", "scheduler": "normal", "seed": 42, "tile_size": OUR_TILE_PX,
            "color_fix": "wavelet", "step_semantics": "astria", "weighting": "from prompt"}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "bench_astria"}},
    }


def write_input(folder, size):
    """A smooth test picture of size x size px, saved as PNG in the server's input folder."""
    import numpy as np
    from PIL import Image

    ys, xs = np.mgrid[0:size, 0:size] / size
    picture = np.stack([ys, xs, (ys * xs)], axis=-1) * 255
    Image.fromarray(picture.astype("uint8")).save(folder / "bench.png")
    return "bench.png"


STAGE_MARKER = "ASTRIA_BENCH_STAGES"  # the line bench/stage_timer prints after each graph
STAGES = ("text encode", "resize", "encode", "sampling", "decode", "colour fix")


def stage_split(row):
    """The row's per-stage seconds and peak RSS above the idle server (bench/stage_timer, inside the server), the
    rest of the graph's time as "other"."""
    timed = row["stages"].get("stages", {})
    peaks = row["stages"].get("peak_rss", {})
    parts = [f"{stage} {timed[stage]:.1f} s" + (f" (+{(peaks[stage] - row['baseline']) / 2**30:.2f} GB)"
                                                 if stage in peaks else "")
             for stage in STAGES if stage in timed]
    other = row["stages"].get("total", float("nan")) - sum(timed.values())
    return ", ".join(parts + [f"other {other:.1f} s"])


def run_case(name, graph_for, size, use_gpu, comfy_args=(), peer_folders=()):
    """Start a fresh ComfyUI, queue one graph, measure it, stop the server; returns the figures."""
    work = Path(tempfile.mkdtemp(prefix=f"astria-bench-{name}-"))
    dirs = {key: work / key for key in ("user", "input", "output", "temp")}
    for folder in dirs.values():
        folder.mkdir()
    alias_folder = dirs["user"] / "default" / "astria"
    alias_folder.mkdir(parents=True)
    (alias_folder / "lora_aliases.json").write_text(json.dumps(
        {"more_details": "tiny_sd15_lora.safetensors", "SDXLrender_v2.0": "tiny_sd15_lora.safetensors"}))
    link_folder = work / "custom_nodes"
    link_folder.mkdir()
    (link_folder / "ComfyUI-Astria").symlink_to(PACK_ROOT, target_is_directory=True)
    # bench/stage_timer: times the host's VAE, sampler, text-encoder and resize calls (and ours) in this server only
    (link_folder / "astria_bench_stage_timer").symlink_to(PACK_ROOT / "bench" / "stage_timer", target_is_directory=True)
    for folder in peer_folders:  # a comparison pack, in this bench server only
        (link_folder / Path(folder).name).symlink_to(Path(folder).resolve(), target_is_directory=True)
    yaml = work / "paths.yaml"
    kinds = ("checkpoints", "loras", "embeddings", "vae", "upscale_models", "controlnet")
    yaml.write_text("bench:\n    base_path: %s\n%s\n    custom_nodes: %s\n" % (
        MODELS_DIR, "\n".join(f"    {kind}: {kind}" for kind in kinds), link_folder))
    image_name = write_input(dirs["input"], size)
    port = free_port()
    command = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
               "--extra-model-paths-config", str(yaml), "--database-url", f"sqlite:///{dirs['user']}/db.sqlite"]
    command += [] if use_gpu else ["--cpu"]
    command += list(comfy_args)
    for key in ("user", "input", "output", "temp"):
        command += [f"--{key}-directory", str(dirs[key])]
    log = open(work / "log.txt", "wb")
    process = subprocess.Popen(command, cwd=COMFY_DIR, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/system_stats", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        baseline = rss_bytes(process.pid)
        anon_baseline = rss_bytes(process.pid, "RssAnon")
        peak = [baseline]
        anon_peak = [anon_baseline]
        gpu_baseline = torch_reserved(url) if use_gpu else 0
        gpu_peak = [gpu_baseline]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_bytes(process.pid))
                anon_peak[0] = max(anon_peak[0], rss_bytes(process.pid, "RssAnon"))
                if use_gpu:
                    gpu_peak[0] = max(gpu_peak[0], torch_reserved(url))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        body = json.dumps({"prompt": graph_for(image_name), "client_id": uuid.uuid4().hex}).encode()
        started = time.perf_counter()
        request = urllib.request.Request(url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        prompt_id = json.loads(urllib.request.urlopen(request).read())["prompt_id"]
        while True:
            history = json.loads(urllib.request.urlopen(f"{url}/history/{prompt_id}").read())
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                break
            time.sleep(0.1)
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
        status = history[prompt_id]["status"]["status_str"]
        text = (work / "log.txt").read_text(errors="replace")
        steps = [int(m) for m in re.findall(r"(\d+)/\d+ \[", text)]
        vae_ways = sorted(set(re.findall(r"Astria (VAE (?:en|de)code: [^(;]*)", text)))
        stage_lines = re.findall(STAGE_MARKER + r" (\{.*\})", text)
        stages = json.loads(stage_lines[-1]) if stage_lines else {"total": float("nan"), "stages": {}}
        saved = sorted(dirs["output"].rglob("*.png"))
        seams = seam_ratio(saved[0], USDU_TILE_PX) if saved else float("nan")
        kept = None
        if saved:  # kept for the image comparisons (the work folder goes)
            kept = Path(tempfile.gettempdir()) / "astria-bench-images" / f"{name}-{size}.png"
            kept.parent.mkdir(exist_ok=True)
            shutil.copyfile(saved[0], kept)
        return {"case": name, "size": size, "status": status, "seconds": elapsed,
                "peak_rss_gb": (peak[0] - baseline) / 2**30, "peak_anon_gb": (anon_peak[0] - anon_baseline) / 2**30,
                "peak_gpu_gb": (gpu_peak[0] - gpu_baseline) / 2**30,
                "sampler_steps": max(steps) if steps else None, "vae_ways": vae_ways, "seam_ratio": seams,
                "stages": stages, "baseline": baseline, "image": str(kept) if kept else None}
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="input sides in px (output is 2x)")
    parser.add_argument("--gpu", action="store_true", help="run on the GPU (default: --cpu)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--tile", type=int, default=768, help="our node's tile_size in px (default 768, the node's)")
    parser.add_argument("--comfy-args", default="", help="more arguments for ComfyUI's main.py, e.g. "
                        "'--front-end-root DIR' where the frontend package is not installed")
    parser.add_argument("--only-ours", action="store_true", help="skip the built-ins (for trying tile sizes)")
    parser.add_argument("--usdu-folder", help="a ComfyUI_UltimateSDUpscale folder laid out by peer-usdu.sh: adds "
                        "its column and ours with step_semantics=comfyui (its 16 steps), loaded by this bench only")
    parser.add_argument("--usdu-label", default="", help="the peer-usdu.sh line naming both commits, printed")
    parser.add_argument("--skip-builtins", action="store_true", help="with --usdu-folder: only USDU and ours")
    parser.add_argument("--cases", nargs="+", help="run only these of the cases the other flags select (e.g. usdu "
                        "astria-cui astria-loc)")
    parser.add_argument("--local-vae-attention", action="store_true", help="with --usdu-folder: add ours with "
                        "comfyui semantics and vae_attention=local, and its pixel difference to the exact one")
    args = parser.parse_args()
    global OUR_TILE_PX  # noqa: PLW0603 (a script's one setting)
    OUR_TILE_PX = args.tile
    rows = []
    for size in args.sizes:
        cases = [("astria", astria_graph)] if args.only_ours else [("built-ins", builtin_graph), ("astria", astria_graph)]
        if args.usdu_folder:
            cases = [case for case in cases if not (args.skip_builtins and case[0] == "built-ins")]
            cases += [("usdu", usdu_graph), ("astria-cui", astria_comfyui_graph)]
            cases += [("astria-loc", astria_local_graph)] if args.local_vae_attention else []
        cases = [case for case in cases if not args.cases or case[0] in args.cases]
        for name, graph_for in cases:
            peers = [args.usdu_folder] if name == "usdu" else []
            row = run_case(name, graph_for, size, args.gpu, args.comfy_args.split(), peers)
            rows.append(row)
            gpu = f"  GPU reserved peak +{row['peak_gpu_gb']:.2f} GB" if args.gpu else ""
            print(f"{size:>5}->{size * 2:<5} {name:<10} {row['status']:<8} {row['seconds']:8.1f} s  "
                  f"peak +{row['peak_rss_gb']:.3f} GiB (RssAnon +{row['peak_anon_gb']:.3f} GiB; bound "
                  f"{memory_bound(size) / 2**30:.3f} GiB){gpu}  steps {row['sampler_steps']}  "
                  f"seams {row['seam_ratio']:.3f}  {'; '.join(w.strip() for w in row['vae_ways'])}", flush=True)
            print(f"{'':12}stages: {stage_split(row)}", flush=True)
    if args.usdu_folder:
        print(f"\nvs UltimateSDUpscale ({args.usdu_label or args.usdu_folder}); targets at equal steps (astria-cui): "
              "time <= 1.05x at 256->512, <= 0.9x at 512->1024 and above; peak <= 1.0x")
        for size in args.sizes:
            peer = next(r for r in rows if r["size"] == size and r["case"] == "usdu")
            for name in ("astria", "astria-cui", "astria-loc"):
                ours = next((r for r in rows if r["size"] == size and r["case"] == name), None)
                if ours:
                    print(f"{size:>5}->{size * 2:<5} {name:<10} time {ours['seconds'] / peer['seconds']:.2f}x  "
                          f"peak RSS {ours['peak_rss_gb'] / max(peer['peak_rss_gb'], 1e-9):.2f}x  "
                          f"RssAnon {ours['peak_anon_gb'] / max(peer['peak_anon_gb'], 1e-9):.2f}x")
            exact, local = (next((r for r in rows if r["size"] == size and r["case"] == n), None)
                            for n in ("astria-cui", "astria-loc"))
            if exact and local:
                most, mean = pixel_difference(exact["image"], local["image"])
                print(f"{size:>5}->{size * 2:<5} vae_attention local vs exact (same seed, 8-bit PNGs): max abs "
                      f"{most:.4f}, mean abs {mean:.2e}")
    if args.only_ours or args.skip_builtins:
        return
    print("\nratios ours / built-ins (target: time <= 0.30, peak RSS <= 0.8)")
    for size in args.sizes:
        ours = next(r for r in rows if r["size"] == size and r["case"] == "astria")
        base = next(r for r in rows if r["size"] == size and r["case"] == "built-ins")
        gpu = f"  GPU peak {ours['peak_gpu_gb'] / max(base['peak_gpu_gb'], 1e-9):.2f}x" if args.gpu else ""
        print(f"{size:>5}->{size * 2:<5} time {ours['seconds'] / base['seconds']:.2f}x  "
              f"peak RSS {ours['peak_rss_gb'] / max(base['peak_rss_gb'], 1e-9):.2f}x{gpu}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

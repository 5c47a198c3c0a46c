"""Astria VAE Encode/Decode (Tiled) and Astria Tiled Diffusion: exact one-pass tiled VAE and MultiDiffusion."""
from . import host_diffusion, host_vae
from ._api import io

TILE_TOOLTIP = "Tile side in pixels: smaller tiles use less memory; the result is the same (exact tiling)."
OVERLAP_TOOLTIP = "Kept for drop-in compatibility with the host's node: our tiled VAE is exact and needs no overlap."
TEMPORAL_SIZE_TOOLTIP = "Only used for video VAEs (passed to ComfyUI's tiled VAE): frames per tile."
TEMPORAL_OVERLAP_TOOLTIP = "Only used for video VAEs (passed to ComfyUI's tiled VAE): frames of overlap."


def _tile_inputs(tile_step):
    return [
        io.Int.Input("tile_size", default=512, min=64, max=4096, step=tile_step, tooltip=TILE_TOOLTIP),
        io.Int.Input("overlap", default=64, min=0, max=4096, step=32, tooltip=OVERLAP_TOOLTIP),
        io.Int.Input("temporal_size", default=64, min=8, max=4096, step=4, tooltip=TEMPORAL_SIZE_TOOLTIP),
        io.Int.Input("temporal_overlap", default=8, min=4, max=4096, step=4, tooltip=TEMPORAL_OVERLAP_TOOLTIP),
    ]


def _is_video(vae):
    return getattr(vae, "latent_dim", 2) != 2


class AstriaVAEEncodeTiled(io.ComfyNode):
    """Drop-in VAEEncodeTiled whose tiles give exactly the untiled result, in one pass."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AstriaVAEEncodeTiled",
            display_name="Astria VAE Encode (Tiled)",
            category="Astria/tiling",
            description="Encodes an image in tiles, layer by layer with whole-image GroupNorm statistics: the same "
                        "latent as an untiled encode, at a fraction of its memory.",
            inputs=[io.Image.Input("pixels", tooltip="The image to encode."),
                    io.Vae.Input("vae", tooltip="The VAE to encode with."), *_tile_inputs(64)],
            outputs=[io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    def execute(cls, pixels, vae, tile_size=512, overlap=64, temporal_size=64, temporal_overlap=8) -> io.NodeOutput:
        if _is_video(vae):
            samples = vae.encode_tiled(pixels[..., :3], tile_x=tile_size, tile_y=tile_size, overlap=overlap,
                                       tile_t=temporal_size, overlap_t=temporal_overlap)
        else:
            samples = host_vae.encode(vae, pixels, tile_size, overlap)
        return io.NodeOutput({"samples": samples})


class AstriaVAEDecodeTiled(io.ComfyNode):
    """Drop-in VAEDecodeTiled whose tiles give exactly the untiled result, in one pass."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AstriaVAEDecodeTiled",
            display_name="Astria VAE Decode (Tiled)",
            category="Astria/tiling",
            description="Decodes a latent in tiles, layer by layer with whole-image GroupNorm statistics: no seams, "
                        "no colour shift, a fraction of the untiled memory.",
            inputs=[io.Latent.Input("samples", tooltip="The latent to decode."),
                    io.Vae.Input("vae", tooltip="The VAE to decode with."), *_tile_inputs(32)],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, samples, vae, tile_size=512, overlap=64, temporal_size=64, temporal_overlap=8) -> io.NodeOutput:
        latent = samples["samples"]
        if _is_video(vae):
            compression = vae.spacial_compression_decode()
            images = vae.decode_tiled(latent, tile_x=tile_size // compression, tile_y=tile_size // compression,
                                      overlap=overlap // compression, tile_t=temporal_size,
                                      overlap_t=temporal_overlap)
            if images.ndim == 5:
                images = images.reshape(-1, *images.shape[-3:])
            return io.NodeOutput(images)
        return io.NodeOutput(host_vae.decode(vae, latent, tile_size, overlap))


class AstriaTiledDiffusion(io.ComfyNode):
    """MODEL -> MODEL that denoises overlapping latent tiles each step and blends them (MultiDiffusion)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AstriaTiledDiffusion",
            display_name="Astria Tiled Diffusion",
            category="Astria/tiling",
            description="Makes any sampler denoise large latents in overlapping tiles, blended every step: 4K+ "
                        "images in bounded memory without seams. Conditioning areas and ControlNet hints are "
                        "cropped per tile.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to tile."),
                io.Int.Input("tile_size", default=1024, min=256, max=8192, step=64,
                             tooltip="Tile side in pixels (latent = /8); images no larger than this run untiled."),
                io.Int.Input("overlap", default=64, min=0, max=1024, step=8,
                             tooltip="Overlap between tiles in pixels, blended with smooth weights."),
                io.Int.Input("tile_batch_size", default=4, min=1, max=64,
                             tooltip="Tiles denoised per model call: higher is faster on a GPU, uses more memory."),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, model, tile_size=1024, overlap=64, tile_batch_size=4) -> io.NodeOutput:
        return io.NodeOutput(host_diffusion.with_tiled_diffusion(model, tile_size, overlap, tile_batch_size))


TILING_NODES = [AstriaVAEEncodeTiled, AstriaVAEDecodeTiled, AstriaTiledDiffusion]

"""Astria VAE Encode/Decode (Tiled) and Astria Tiled Diffusion: exact one-pass tiled VAE and MultiDiffusion."""
from . import host_diffusion, host_vae
from ._api import io
from .types import node_schema

TILE_TOOLTIP = "Tile side in pixels: smaller tiles use less memory; the result is the same (exact tiling)."
OVERLAP_TOOLTIP = "Kept for drop-in compatibility with the host's node: our tiled VAE is exact and needs no overlap."
TEMPORAL_SIZE_TOOLTIP = "Only used for video VAEs (passed to ComfyUI's tiled VAE): frames per tile."
TEMPORAL_OVERLAP_TOOLTIP = "Only used for video VAEs (passed to ComfyUI's tiled VAE): frames of overlap."
TILING_CATEGORY = "Astria/tiling"


def _tiled_vae_schema(cls, node_id, display_name, data_input, output, tile_step):
    """The schema both tiled VAE nodes share: their data, the VAE, and the host node's tile widgets."""
    return node_schema(
        cls, node_id, display_name, category=TILING_CATEGORY,
        inputs=[
            data_input,
            io.Vae.Input("vae", tooltip="The VAE to run in tiles."),
            io.Int.Input("tile_size", default=512, min=64, max=4096, step=tile_step, tooltip=TILE_TOOLTIP),
            io.Int.Input("overlap", default=64, min=0, max=4096, step=32, tooltip=OVERLAP_TOOLTIP),
            io.Int.Input("temporal_size", default=64, min=8, max=4096, step=4, tooltip=TEMPORAL_SIZE_TOOLTIP),
            io.Int.Input("temporal_overlap", default=8, min=4, max=4096, step=4, tooltip=TEMPORAL_OVERLAP_TOOLTIP),
            io.Combo.Input("vae_attention", options=host_vae.VAE_ATTENTION_CHOICES, default="exact", optional=True,
                           tooltip=host_vae.VAE_ATTENTION_TOOLTIP),
        ],
        outputs=[output],
    )


def _is_video(vae):
    return getattr(vae, "latent_dim", 2) != 2


class AstriaVAEEncodeTiled(io.ComfyNode):
    """Encodes an image in tiles, layer by layer with whole-image GroupNorm statistics: the same latent as an
    untiled encode, in one pass, at a fraction of its memory. A drop-in VAEEncodeTiled."""

    @classmethod
    def define_schema(cls):
        return _tiled_vae_schema(
            cls, "AstriaVAEEncodeTiled", "Astria VAE Encode (Tiled)",
            io.Image.Input("pixels", tooltip="The image to encode."),
            io.Latent.Output(display_name="LATENT",
                             tooltip="The latent, equal to the untiled encode's (with vae_attention exact)."),
            tile_step=64)

    @classmethod
    def execute(cls, pixels, vae, tile_size, overlap, temporal_size, temporal_overlap,
                vae_attention="exact") -> io.NodeOutput:
        if _is_video(vae):
            samples = vae.encode_tiled(pixels[..., :3], tile_x=tile_size, tile_y=tile_size, overlap=overlap,
                                       tile_t=temporal_size, overlap_t=temporal_overlap)
        else:
            samples = host_vae.encode(vae, pixels, tile_size, overlap, local_attention=vae_attention == "local")
        return io.NodeOutput({"samples": samples})


class AstriaVAEDecodeTiled(io.ComfyNode):
    """Decodes a latent in tiles, layer by layer with whole-image GroupNorm statistics: no seams, no colour shift,
    one pass, a fraction of the untiled memory. A drop-in VAEDecodeTiled."""

    @classmethod
    def define_schema(cls):
        return _tiled_vae_schema(
            cls, "AstriaVAEDecodeTiled", "Astria VAE Decode (Tiled)",
            io.Latent.Input("samples", tooltip="The latent to decode."),
            io.Image.Output(display_name="IMAGE",
                            tooltip="The image, equal to the untiled decode's (with vae_attention exact)."),
            tile_step=32)

    @classmethod
    def execute(cls, samples, vae, tile_size, overlap, temporal_size, temporal_overlap,
                vae_attention="exact") -> io.NodeOutput:
        latent = samples["samples"]
        if _is_video(vae):
            compression = vae.spacial_compression_decode()
            images = vae.decode_tiled(latent, tile_x=tile_size // compression, tile_y=tile_size // compression,
                                      overlap=overlap // compression, tile_t=temporal_size,
                                      overlap_t=temporal_overlap)
            if images.ndim == 5:
                images = images.reshape(-1, *images.shape[-3:])
            return io.NodeOutput(images)
        return io.NodeOutput(host_vae.decode(vae, latent, tile_size, overlap,
                                             local_attention=vae_attention == "local"))


class AstriaTiledDiffusion(io.ComfyNode):
    """Makes any sampler denoise large latents in overlapping tiles, blended every step (MultiDiffusion): 4K+ images
    in bounded memory without seams. Conditioning areas and ControlNet hints are cropped per tile."""

    @classmethod
    def define_schema(cls):
        return node_schema(
            cls, "AstriaTiledDiffusion", "Astria Tiled Diffusion", category=TILING_CATEGORY,
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to tile."),
                io.Int.Input("tile_size", default=1024, min=256, max=8192, step=64,
                             tooltip="Tile side in pixels (latent = /8); images no larger than this run untiled."),
                io.Int.Input("overlap", default=64, min=0, max=1024, step=8,
                             tooltip="Overlap between tiles in pixels, blended with smooth weights."),
                io.Int.Input("tile_batch_size", default=4, min=1, max=64,
                             tooltip="Tiles denoised per model call: higher is faster on a GPU, uses more memory."),
            ],
            outputs=[io.Model.Output(display_name="MODEL",
                                     tooltip="A copy of the model whose sampling steps run in tiles; connect it to "
                                             "any sampler.")],
        )

    @classmethod
    def execute(cls, model, tile_size, overlap, tile_batch_size) -> io.NodeOutput:
        return io.NodeOutput(host_diffusion.with_tiled_diffusion(model, tile_size, overlap, tile_batch_size))


TILING_NODES = [AstriaVAEEncodeTiled, AstriaVAEDecodeTiled, AstriaTiledDiffusion]

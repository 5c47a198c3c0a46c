"""A1111 img2img step semantics, target sizes, padding and the colour fix."""
import pytest

torch = pytest.importorskip("torch", reason="needs torch (the host venv has it)")

from comfyui_astria.nodes.core import img2img  # noqa: E402


@pytest.mark.parametrize(("steps", "denoise", "expected"), [
    (16, 0.1, 2), (20, 0.5, 11), (16, 1.0, 16), (10, 0.999, 10), (16, 0.0, 0), (0, 0.5, 0), (50, 0.35, 18),
    (16, 0.06, 1), (7, 0.3, 3),
])
def test_steps_to_run_follows_a1111(steps, denoise, expected):
    assert img2img.a1111_steps_to_run(steps, denoise) == expected


@pytest.mark.parametrize(("steps", "denoise", "start"), [(16, 0.1, 14), (20, 0.5, 9), (16, 1.0, 0), (5, 0.33, 3),
                                                     (16, 0.0, None)])
def test_sigma_schedule_is_the_tail_a1111_runs(steps, denoise, start):
    """The run starts at sigma index steps - t_enc - 1 (A1111's img2img): 16 steps at 0.1 start at index 14."""
    full = torch.tensor(torch.linspace(14.6, 0.03, steps).tolist() + [0.0])
    tail = img2img.a1111_sigma_schedule(full, denoise)
    if start is None:
        assert tail.numel() == 0
        return
    assert torch.equal(tail, full[start:])
    assert tail[-1] == 0


def test_target_size_rules():
    assert img2img.target_size(333, 500, 2.0) == (666, 1000)
    assert img2img.target_size(100, 50, 2.0, 640, 0) == (640, 320)
    assert img2img.target_size(100, 50, 2.0, 0, 100) == (200, 100)
    assert img2img.target_size(100, 50, 2.0, 300, 200) == (300, 200)
    with pytest.raises(ValueError, match="16384"):
        img2img.target_size(9000, 100, 2.0)


def test_too_small_input_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="at least 64 px"):
        img2img.check_input_size(63, 500)
    img2img.check_input_size(64, 64)


def test_pad_to_multiple_reflects_and_crops_back_exactly():
    image = torch.rand(2, 333, 500, 3)
    padded, original = img2img.pad_to_multiple(image, 8)
    assert padded.shape == (2, 336, 504, 3)
    assert original == (333, 500)
    assert torch.equal(padded[:, 333, :500], image[:, 331])  # reflected row
    assert torch.equal(img2img.crop_to(padded, original), image)
    same, _ = img2img.pad_to_multiple(torch.rand(1, 64, 64, 3), 8)
    assert same.shape == (1, 64, 64, 3)


def test_adain_matches_channel_statistics_of_the_reference():
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(1, 64, 64, 3, generator=generator) * 0.5 + 0.2
    result = (reference * 0.6 + 0.3).clamp(0, 1)
    fixed = img2img.color_fix(result, reference, "adain")
    assert torch.allclose(fixed.mean(dim=(1, 2)), reference.mean(dim=(1, 2)), atol=1e-4)
    assert torch.allclose(fixed.std(dim=(1, 2)), reference.std(dim=(1, 2)), atol=1e-3)


def test_wavelet_keeps_detail_of_result_and_colour_of_reference():
    generator = torch.Generator().manual_seed(1)
    reference = torch.full((1, 128, 128, 3), 0.3)
    detail = (torch.rand(1, 128, 128, 3, generator=generator) - 0.5) * 0.1
    result = (torch.full((1, 128, 128, 3), 0.6) + detail).clamp(0, 1)  # shifted colour, fine detail
    fixed = img2img.color_fix(result, reference, "wavelet")
    assert abs(fixed.mean().item() - 0.3) < 0.01  # colour came from the reference
    assert (fixed - 0.3).std().item() > 0.5 * detail.std().item()  # detail survived
    assert torch.equal(img2img.color_fix(result, reference, "none"), result)
    with pytest.raises(ValueError, match="wavelet"):
        img2img.color_fix(result, reference, "median")


@pytest.mark.parametrize("mode", ["wavelet", "adain"])
def test_colour_fix_in_row_bands_equals_the_whole_image_pass(monkeypatch, mode):
    """Bands of 40 rows (with the wavelet's 31-row halo) give the one-band result: the banding is exact."""
    generator = torch.Generator().manual_seed(2)
    result = torch.rand(2, 150, 97, 3, generator=generator)
    reference = torch.rand(2, 150, 97, 3, generator=generator)
    monkeypatch.setattr(img2img, "BAND_ROWS", 1000)
    whole = img2img.color_fix(result, reference, mode)
    monkeypatch.setattr(img2img, "BAND_ROWS", 40)
    banded = img2img.color_fix(result, reference, mode)
    assert (banded - whole).abs().max().item() < 1e-5


def test_lanczos_resize_is_pils_lanczos_in_bands(monkeypatch):
    import numpy as np
    from PIL import Image

    image = torch.rand(1, 37, 53, 3, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(img2img, "BAND_ROWS", 16)
    got = img2img.lanczos_resize(image, 106, 74)
    as_bytes = Image.fromarray((image[0].numpy() * 255).clip(0, 255).astype(np.uint8))
    expected = torch.from_numpy(np.asarray(as_bytes.resize((106, 74), Image.Resampling.LANCZOS)).astype(np.float32))
    assert got.shape == (1, 74, 106, 3)
    assert torch.equal(got[0], expected / 255.0)

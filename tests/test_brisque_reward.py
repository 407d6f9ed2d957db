"""BRISQUE with the SVM shipped in the `brisque` package ranks a sharp image above degraded versions."""
import numpy as np
from PIL import Image, ImageFilter

from rewards import make_reward


def _natural(n: int = 128) -> np.ndarray:
    """An image with natural-image statistics (a 1/f spectrum), which BRISQUE's model was trained on."""
    rng = np.random.default_rng(0)
    f2 = np.fft.fftfreq(n)[:, None] ** 2 + np.fft.fftfreq(n)[None, :] ** 2
    f2[0, 0] = 1
    chans = []
    for _ in range(3):
        im = np.real(np.fft.ifft2((rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))) / f2 ** 0.75))
        chans.append((im - im.min()) / (im.max() - im.min()))
    return (np.stack(chans, -1) * 255).astype(np.uint8)


def test_brisque_prefers_sharp_over_blurred_and_noisy():
    sharp = _natural()
    blurred = np.asarray(Image.fromarray(sharp).filter(ImageFilter.GaussianBlur(3)))
    noisy = np.clip(sharp + np.random.default_rng(0).normal(0, 40, sharp.shape), 0, 255).astype(np.uint8)
    out = make_reward("brisque")(np.stack([sharp, blurred, noisy]), [""] * 3, [{}] * 3)
    q = out["quality"]
    assert q[0] > q[1] and q[0] > q[2], out
    np.testing.assert_allclose(q, (100 - out["brisque"]) / 100)

"""On-device strong augmentations and CutMix boxes of CrossMatch / UniMatch (crossmatch.md section 3).

Every function draws independent parameters per sample from torch's global RNG on the batch's device
(checkpointed by the trainer, so a resumed run repeats them) and works on the whole batch at once.

* 3D (LA, torchio in the official code): p = 0.8 [RandomBiasField (order 3, coefficients U(-0.5, 0.5))
  then RandomGamma (log gamma U(-0.5, 0.5), sign(I)|I|^gamma)]; p = 0.5 RandomBlur (std U(0.1, 2) per axis).
* 2D (ACDC, PIL in the official code, images in [0, 1]): p = 0.8 ColorJitter, of which only brightness and
  contrast act on grayscale (factors U(0.5, 1.5), in random order); p = 0.5 GaussianBlur (sigma U(0.1, 2)).
  With `quantise=True` every step is rounded to 8-bit levels as the PIL pipeline does.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

BLUR_SIGMA = (0.1, 2.0)
BLUR_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default, used by torchio


def _uniform(shape: Sequence[int], low: float, high: float, device: torch.device) -> torch.Tensor:
    return torch.rand(tuple(shape), device=device) * (high - low) + low


def _coin(n: int, p: float, device: torch.device) -> torch.Tensor:
    """[n] booleans, True with probability p."""
    return torch.rand(n, device=device) < p


def _per_sample(mask: torch.Tensor, ndim: int) -> torch.Tensor:
    return mask.view(-1, *([1] * (ndim - 1)))


def quantise_8bit(x: torch.Tensor) -> torch.Tensor:
    """floor(clip(x, 0, 1) * 255) / 255: an [0, 1] image after a uint8 cast (PIL truncates)."""
    return torch.floor(x.clamp(0, 1) * 255) / 255


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of [N, C, *S] with per-sample, per-axis sigma [N, len(S)] (voxel units).

    Kernels share one support (radius ceil(4 * max sigma)), normalised to sum 1; reflect padding.
    """
    n, c, *spatial = x.shape
    radius = max(1, math.ceil(BLUR_TRUNCATE * float(BLUR_SIGMA[1])))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    out = x
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(spatial) - 1]
    for axis in range(len(spatial)):
        s = sigma[:, axis].to(x.dtype).clamp_min(1e-6)
        kernel = torch.exp(-0.5 * (offsets[None] / s[:, None]) ** 2)
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [N*C, K]
        shape = [1] * len(spatial)
        shape[axis] = kernel.shape[1]
        pad = [0] * (2 * len(spatial))
        pad[2 * (len(spatial) - 1 - axis)] = pad[2 * (len(spatial) - 1 - axis) + 1] = radius
        padded = F.pad(out.reshape(1, n * c, *spatial), pad, mode="reflect")
        out = conv(padded, kernel.view(n * c, 1, *shape), groups=n * c).view(n, c, *spatial)
    return out


def _monomials(spatial: Sequence[int], order: int, device: torch.device) -> torch.Tensor:
    """[T, *S] products x^i y^j z^k with i + j + k <= order on a [-1, 1] grid (torchio's bias basis)."""
    axes = torch.meshgrid(*(torch.linspace(-1, 1, s, device=device) for s in spatial), indexing="ij")
    terms = []
    for powers in itertools.product(range(order + 1), repeat=len(spatial)):
        if sum(powers) <= order:
            term = torch.ones(tuple(spatial), device=device)
            for axis, power in zip(axes, powers, strict=True):
                term = term * axis ** power
            terms.append(term)
    return torch.stack(terms)


def random_bias_field(x: torch.Tensor, order: int = 3, coefficient: float = 0.5) -> torch.Tensor:
    """Multiply by exp(sum_t c_t m_t) with polynomial terms m_t and c_t ~ U(-coefficient, coefficient)."""
    basis = _monomials(x.shape[2:], order, x.device)
    coefficients = _uniform((len(x), len(basis)), -coefficient, coefficient, x.device)
    field = torch.einsum("nt,t...->n...", coefficients, basis).exp()
    return x * field.unsqueeze(1).to(x.dtype)


def random_gamma(x: torch.Tensor, log_gamma: tuple[float, float] = (-0.5, 0.5)) -> torch.Tensor:
    """sign(I) |I|^gamma with gamma = exp(U(log_gamma)) per sample (torchio's rule for negative images)."""
    gamma = _per_sample(_uniform((len(x),), *log_gamma, x.device).exp(), x.ndim).to(x.dtype)
    return x.sign() * x.abs().pow(gamma)


def strong_augment_3d(x: torch.Tensor, p_intensity: float = 0.8, p_blur: float = 0.5) -> torch.Tensor:
    """LA strong view: p = 0.8 bias field then gamma; p = 0.5 blur with sigma ~ U(0.1, 2) per axis."""
    n, spatial = len(x), x.shape[2:]
    intensity = _per_sample(_coin(n, p_intensity, x.device), x.ndim)
    x = torch.where(intensity, random_gamma(random_bias_field(x)), x)
    blur = _per_sample(_coin(n, p_blur, x.device), x.ndim)
    sigma = _uniform((n, len(spatial)), *BLUR_SIGMA, x.device)
    return torch.where(blur, gaussian_blur(x, sigma), x)


def strong_augment_2d(x: torch.Tensor, quantise: bool = True, p_jitter: float = 0.8,
                      p_blur: float = 0.5) -> torch.Tensor:
    """ACDC strong view of an [0, 1] image: brightness/contrast jitter (p = 0.8), Gaussian blur (p = 0.5).

    Brightness: I * b; contrast: m + c (I - m) around the image mean m (PIL rounds m to an 8-bit level);
    both clipped to [0, 1]; b, c ~ U(0.5, 1.5), applied in random order as ColorJitter's permutation does.
    """
    n, dims = len(x), x.ndim

    def step(v: torch.Tensor) -> torch.Tensor:
        return quantise_8bit(v) if quantise else v.clamp(0, 1)

    def brightness(v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return step(v * b)

    def contrast(v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mean = v.mean(dim=tuple(range(1, dims)), keepdim=True)
        if quantise:
            mean = torch.floor(mean * 255 + 0.5) / 255
        return step(mean + c * (v - mean))

    b = _per_sample(_uniform((n,), 0.5, 1.5, x.device), dims).to(x.dtype)
    c = _per_sample(_uniform((n,), 0.5, 1.5, x.device), dims).to(x.dtype)
    brightness_first = _per_sample(_coin(n, 0.5, x.device), dims)
    jittered = torch.where(brightness_first, contrast(brightness(x, b), c), brightness(contrast(x, c), b))
    x = torch.where(_per_sample(_coin(n, p_jitter, x.device), dims), jittered, x)
    sigma = _uniform((n, 1), *BLUR_SIGMA, x.device).expand(n, 2)
    blurred = gaussian_blur(x, sigma)
    if quantise:
        blurred = torch.round(blurred.clamp(0, 1) * 255) / 255
    return torch.where(_per_sample(_coin(n, p_blur, x.device), dims), blurred, x)


def _box_mask(starts: torch.Tensor, sizes: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """[N, *S] float mask, 1 on [start, start + size) along every axis (clipped to the array)."""
    n, mask = len(starts), None
    for axis, length in enumerate(spatial):
        idx = torch.arange(length, device=starts.device)
        inside = (idx >= starts[:, axis, None]) & (idx < (starts[:, axis] + sizes[:, axis])[:, None])
        inside = inside.view(n, *[length if a == axis else 1 for a in range(len(spatial))])
        mask = inside if mask is None else mask & inside
    assert mask is not None
    return mask.float()


def cutmix_boxes_2d(n: int, size: Sequence[int], device: torch.device, p: float = 0.5,
                    area: tuple[float, float] = (0.02, 0.4), ratio: tuple[float, float] = (0.3, 1 / 0.3),
                    candidates: int = 256) -> torch.Tensor:
    """UniMatch `obtain_cutmix_box` for [N, H, W] at once: with probability p a box of area U(area) * H * W,
    w = floor(sqrt(area / r)) along W, h = floor(sqrt(area * r)) along H, r ~ U(ratio), top-left uniform
    over the image, redrawn (r and position) until it fits; otherwise empty.

    The redraw loop becomes `candidates` parallel draws of which the first that fits is taken; if none fits
    (probability < 1e-9 at 256 draws) the last draw is clamped inside the image.
    """
    height, width = size
    box_area = _uniform((n, 1), *area, device) * height * width
    r = _uniform((n, candidates), *ratio, device)
    w = torch.floor(torch.sqrt(box_area / r)).long()
    h = torch.floor(torch.sqrt(box_area * r)).long()
    x = torch.randint(0, width, (n, candidates), device=device)
    y = torch.randint(0, height, (n, candidates), device=device)
    fits = (x + w <= width) & (y + h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), candidates - 1, device=device))
    pick = first[:, None]
    h, w = h.gather(1, pick)[:, 0].clamp(max=height), w.gather(1, pick)[:, 0].clamp(max=width)
    y = torch.minimum(y.gather(1, pick)[:, 0], height - h)
    x = torch.minimum(x.gather(1, pick)[:, 0], width - w)
    boxes = _box_mask(torch.stack([y, x], 1), torch.stack([h, w], 1), size)
    return boxes * _per_sample(_coin(n, p, device), boxes.ndim)


def cutmix_boxes_3d(n: int, size: Sequence[int], device: torch.device, p: float = 0.5,
                    area: tuple[float, float] = (0.02, 0.4), ratio: tuple[float, float] = (0.3, 1 / 0.3),
                    swapped_axes: bool = True) -> torch.Tensor:
    """CrossMatch-LA `obtain_cutmix_box` for [N, X, Y, Z]: with probability p a box of volume
    V = U(area) * X * Y * Z, w = floor((V / r)^(1/3)), h = floor((V r)^(1/3)), d = floor(V^(1/3)),
    x ~ U[0, X - w), y ~ U[0, Y - h), z ~ U[0, Z - d).

    `swapped_axes=True` writes the box as the official code does, mask[z:z+d, y:y+h, x:x+w] (quirk Q1:
    the z range lands on axis 0 and the x range on axis 2, clipped); False writes mask[x:x+w, y:y+h, z:z+d].
    Sides are capped at size - 1 so that small patches keep a valid draw (never active at 112x112x80).
    """
    volume = _uniform((n,), *area, device) * math.prod(size)
    r = _uniform((n,), *ratio, device)
    sides = torch.stack([(volume / r), (volume * r), volume], 1).pow(1 / 3).floor().long()
    limits = torch.tensor(list(size), device=device)
    sides = torch.minimum(sides, limits - 1)
    starts = (torch.rand(n, 3, device=device) * (limits - sides)).floor().long()
    if swapped_axes:
        starts, sides = starts.flip(1), sides.flip(1)
    boxes = _box_mask(starts, sides, size)
    return boxes * _per_sample(_coin(n, p, device), boxes.ndim)

"""Synthetic chest-radiograph-like images (PA view), labelled lesion (1) / no lesion (0); no download needed.

Each image is a sum of attenuation maps drawn in a posed coordinate frame (small rotation, zoom and shift):
soft-tissue thorax silhouette with shoulders and neck, two air-filled lung fields (dark) with domed hemidiaphragms,
mediastinum, heart shadow, hila, spine with vertebral segmentation, posterior and anterior ribs, clavicles and a
mottled vascular texture. Exposure (gain, offset, gamma), detector noise and blur vary per image.

About half of the images carry a lesion centred in aerated lung: either a round nodule/mass (Gaussian blob) or a
patchy consolidation (smooth noise thresholded inside an envelope). Size, position, contrast and type vary. Because
the lesion moves and the anatomy/exposure vary much more than the lesion adds, a linear probe on raw pixels is
close to chance (test AUROC ~0.57 at 64 px and at 112 px seen at 56 px, 3000 training images), while a small CNN
trained on 6000 images reaches ~0.90: learnable from local structure, not from global intensity.

``finding`` swaps the focal lesion for a diffuse bilateral pattern, zero-mean in attenuation so that it adds no
brightness cue: ``reticular`` (band-limited texture, one random grid cell per ~16 px) or ``miliary``
(dozens of small nodules, the lung mean subtracted). docs/BENCHMARKS.md ("`raddino demo` with diffuse findings")
records how raw pixels, random init and the pretrained teacher probe on them.

Image ``i`` depends only on ``(seed, i)``: separate generators for anatomy, lesion and detector are spawned from
``numpy.random.SeedSequence([seed, i])``, so ``lesion=True/False`` renders the same patient with or without it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from raddino.errors import RaddinoError

_RIB_COUNT = 10  # posterior ribs visible over the lungs on a PA film


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise (size, size) float32 in about [-1, 1]: a (cells, cells) random grid upsampled bicubically."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC))


def _sigmoid_edge(margin: np.ndarray, softness: float) -> np.ndarray:
    """Soft indicator of ``margin > 0`` (a smooth organ boundary of width ~``softness`` in normalised units)."""
    return 0.5 + 0.5 * np.tanh(margin / softness)


def _lesion(rng: np.random.Generator, *, x: np.ndarray, y: np.ndarray, lungs: np.ndarray, size: int) -> np.ndarray:
    """Extra attenuation (size, size) of one lesion centred in aerated lung: a nodule/mass or a consolidation.

    ``x, y`` are the posed coordinates, ``lungs`` the soft lung-field map (0..1, already cut by heart/mediastinum).
    """
    inside = np.flatnonzero(lungs.ravel() > 0.6)
    if len(inside) == 0:  # cannot happen for sane anatomy; fall back to the most aerated pixel
        inside = np.array([int(np.argmax(lungs))])
    centre = int(inside[rng.integers(len(inside))])
    lx, ly = float(x.ravel()[centre]), float(y.ravel()[centre])
    if rng.random() < 0.5:  # nodule / mass
        radius = rng.uniform(0.05, 0.14)
        shape = np.exp(-((((x - lx) ** 2 + (y - ly) ** 2) / (radius**2)) ** 1.5))
    else:  # patchy consolidation: thresholded smooth noise inside a soft envelope, confined to the lung
        radius = rng.uniform(0.10, 0.22)
        envelope = np.exp(-((x - lx) ** 2 + (y - ly) ** 2) / radius**2)
        noise = _smooth_noise(rng, size, 12)  # ~0.17-wide patches whatever the pixel size
        patches = np.clip(noise - noise.ravel()[centre] + 1.0, 0.0, 1.5) / 1.5  # the centre is always involved
        shape = envelope * patches * np.clip(lungs, 0.0, 1.0)
    return rng.uniform(0.15, 0.50) * shape


def _reticular(rng: np.random.Generator, *, x: np.ndarray, y: np.ndarray, lungs: np.ndarray, size: int) -> np.ndarray:
    """Zero-mean band-limited texture (size, size) over both lungs: an interstitial (reticular) pattern."""
    texture = _smooth_noise(rng, size, max(4, size // 16))
    return rng.uniform(0.10, 0.18) * (texture - texture.mean()) * np.clip(lungs, 0.0, 1.0)


def _miliary(rng: np.random.Generator, *, x: np.ndarray, y: np.ndarray, lungs: np.ndarray, size: int) -> np.ndarray:
    """Dozens of small nodules (size, size) scattered over aerated lung, their mean over the lungs subtracted."""
    inside = np.flatnonzero(lungs.ravel() > 0.6)
    if len(inside) == 0:  # cannot happen for sane anatomy (see _lesion)
        inside = np.array([int(np.argmax(lungs))])
    centres = inside[rng.integers(len(inside), size=int(rng.integers(60, 120)))]
    radius = rng.uniform(0.03, 0.045)
    nodules = np.zeros_like(x)
    for centre in centres:
        nodules += np.exp(-((x - x.ravel()[centre]) ** 2 + (y - y.ravel()[centre]) ** 2) / radius**2)
    weight = np.clip(lungs, 0.0, 1.0)
    nodules = np.clip(nodules, 0.0, 1.5) * weight
    aerated = lungs > 0.3
    nodules = nodules - float(nodules[aerated].mean()) * weight  # no net brightening of the lungs
    return rng.uniform(0.25, 0.40) * nodules


FINDINGS = {"focal": _lesion, "reticular": _reticular, "miliary": _miliary}


def synthetic_cxr(
    index: int, *, seed: int, size: int, lesion: bool | None = None, finding: str = "focal"
) -> tuple[np.ndarray, int]:
    """Generate synthetic radiograph ``index`` of the stream ``seed``.

    Args:
        index: image number (>= 0); images are independent of each other.
        seed: stream seed; ``(seed, index)`` fully determines the image and its label.
        size: side length in pixels (>= 16); anatomy is drawn in normalised coordinates, so any size looks alike.
        lesion: None draws it (probability 1/2); True / False forces it. Anatomy, lesion and detector effects come
            from separate generators, so forcing the lesion gives the same patient with / without the finding.
        finding: what a positive image carries: ``focal`` (a nodule/mass or consolidation), ``reticular`` or
            ``miliary`` (diffuse, zero-mean patterns over both lungs); the anatomy does not depend on it.

    Returns:
        ``(image (size, size) uint8, label)`` with ``label`` 1 when a lesion is present, else 0.
    """
    if index < 0:
        raise RaddinoError(f"synthetic image index must be >= 0, got {index}")
    if size < 16:
        raise RaddinoError(f"synthetic image size must be >= 16 pixels, got {size}")
    if finding not in FINDINGS:
        raise RaddinoError(f"unknown synthetic finding {finding!r}; choose one of {', '.join(FINDINGS)}")
    rng, lesion_rng, detector_rng = (np.random.default_rng(s) for s in np.random.SeedSequence([seed, index]).spawn(3))
    drawn = bool(lesion_rng.random() < 0.5)
    label = int(drawn if lesion is None else lesion)

    # Posed coordinates: x to the image right (patient's left), y downwards, both in [-1, 1] before posing.
    lin = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
    theta = np.deg2rad(rng.uniform(-6.0, 6.0))
    zoom = rng.uniform(0.88, 1.08)
    tx, ty = rng.uniform(-0.06, 0.06, size=2)
    cos_t, sin_t = np.cos(theta) / zoom, np.sin(theta) / zoom
    x0, y0 = lin[None, :] - tx, lin[:, None] - ty
    x = (cos_t * x0 + sin_t * y0).astype(np.float32)
    y = (-sin_t * x0 + cos_t * y0).astype(np.float32)
    ax = np.abs(x)

    # Thorax silhouette: lateral chest wall, sloping shoulders and the neck above them.
    body_w = rng.uniform(0.90, 1.02)
    shoulder_y = rng.uniform(-0.86, -0.74)
    above = np.clip((shoulder_y - y) / 0.3, 0.0, 1.0)
    half_width = body_w * (1.0 - 0.75 * above**1.4) + 0.04 * y
    body = _sigmoid_edge(half_width - ax, 0.02)
    rel = np.clip(ax / half_width, 0.0, 1.0)
    soft = body * (0.85 + 0.3 * rel**8 + 0.15 * above)  # tangential chest wall and shoulders read brighter

    # Lungs: rounded apex, convex lateral border, straighter medial border, domed hemidiaphragm with a sharp
    # costophrenic angle; the right one (image left) sits higher because of the liver.
    lung_c = rng.uniform(0.40, 0.46)
    lung_w = rng.uniform(0.29, 0.35)
    top = rng.uniform(-0.80, -0.68)
    bottom_r = rng.uniform(0.42, 0.60)
    bottoms = (bottom_r, bottom_r + rng.uniform(0.02, 0.10))
    dome = rng.uniform(0.12, 0.22)
    lungs = np.zeros_like(x)
    for side, bottom in zip((-1.0, 1.0), bottoms, strict=True):
        b = (y - top) / (bottom - top)  # 0 at the apex, 1 at the costophrenic angle
        cx = side * (lung_c - 0.06 + 0.08 * np.clip(b, 0.0, 1.0))  # apex sits medially, base spreads laterally
        a = side * (x - cx) / lung_w  # -1 (medial) .. 1 (lateral)
        width = np.clip(b, 0.0, None) ** 0.4 * (1.0 + 0.1 * b) - 0.05
        dia = bottom - dome * np.clip(1.0 - (a + 0.1) ** 2 / 1.3, 0.0, 1.0)  # dome highest mid-lung
        margin = np.minimum(np.minimum(width - np.abs(a), (dia - y) / lung_w), b * 2.0)
        lungs = lungs + _sigmoid_edge(margin, 0.05)

    # Mediastinum, trachea and heart (bulging to the patient's left = image right) displace lung.
    med_w = rng.uniform(0.10, 0.14) + 0.05 * np.clip(y + 0.2, 0.0, None)
    mediastinum = _sigmoid_edge(med_w - np.abs(x - 0.02), 0.03) * _sigmoid_edge(y + 0.95, 0.05)
    trachea = _sigmoid_edge(0.035 - np.abs(x - 0.01), 0.01) * _sigmoid_edge(-0.22 - y, 0.03)
    hx, hy = rng.uniform(0.12, 0.20), rng.uniform(0.28, 0.40)
    hrx, hry = rng.uniform(0.36, 0.44), rng.uniform(0.24, 0.30)
    heart = _sigmoid_edge(1.0 - ((x - hx) / hrx) ** 2 - ((y - hy) / hry) ** 2, 0.3)
    aortic_knob = np.exp(-(((x - 0.13) / 0.06) ** 2) - ((y + 0.40) / 0.06) ** 2)
    occupied = np.clip(mediastinum + heart, 0.0, 1.0)
    lungs = lungs * (1.0 - 0.9 * occupied)
    hila = sum(np.exp(-(((x - s * 0.2) / 0.07) ** 2) - ((y + 0.05) / 0.13) ** 2) for s in (-1.0, 1.0))

    # Bones. Spine: vertebral bodies as a periodic modulation of a central band.
    spine = _sigmoid_edge(0.07 - np.abs(x - 0.01), 0.012) * (0.6 + 0.4 * np.cos(np.pi * y / 0.13) ** 2)
    # Posterior ribs: bands of a warped height coordinate (they descend laterally and spread out lower down).
    cage = _sigmoid_edge(half_width - 0.05 - ax, 0.03) * _sigmoid_edge(ax - 0.08, 0.02)
    cage = cage * _sigmoid_edge(max(bottoms) + 0.1 - y, 0.05) * _sigmoid_edge(y - top + 0.1, 0.05)
    rib_height = y - rng.uniform(0.45, 0.65) * ax**2 + 0.15 * ax - top + 0.1
    phase = np.clip(rib_height, 0.0, None) ** 0.85 * rng.uniform(5.5, 6.5) + rng.uniform(0.0, 1.0)
    ribs_post = np.clip(np.cos(2 * np.pi * phase) - 0.1, 0.0, None) ** 0.7
    # Anterior ribs: fainter, descending towards the midline.
    phase_a = (y + 0.4 * ax) * 4.0 + rng.uniform(0.0, 1.0)
    ribs_ant = np.clip(np.cos(2 * np.pi * phase_a) - 0.3, 0.0, None) ** 0.7
    ribs = cage * (ribs_post + 0.3 * ribs_ant)
    # Clavicles: bands from the sternal notch running laterally and slightly upwards.
    clav_y = shoulder_y + 0.12 - 0.18 * ax + 0.1 * ax**2
    clavicles = np.exp(-(((y - clav_y) / 0.035) ** 2)) * _sigmoid_edge(ax - 0.07, 0.02)
    clavicles = clavicles * _sigmoid_edge(0.72 - ax, 0.03)

    # Vascular markings: band-limited texture, denser towards the hila.
    texture = _smooth_noise(rng, size, max(8, size // 6))
    vessels = lungs * np.clip(texture, 0.0, None) * (0.4 + 0.6 * hila)

    attenuation = (
        soft
        - rng.uniform(0.50, 0.62) * lungs
        + 0.15 * heart * body
        + 0.15 * mediastinum
        - 0.12 * trachea
        + 0.12 * aortic_knob
        + 0.10 * hila
        + 0.12 * spine
        + rng.uniform(0.12, 0.20) * ribs
        + 0.22 * clavicles
        + 0.08 * vessels
    )

    # Exposure is drawn before the lesion so that forcing the lesion leaves it unchanged.
    gain, offset, gamma = rng.uniform(0.85, 1.15), rng.uniform(-0.08, 0.06), rng.uniform(0.8, 1.25)
    if label:
        attenuation = attenuation + FINDINGS[finding](lesion_rng, x=x, y=y, lungs=lungs, size=size)

    # Display: compress the attenuation like a film response, then vary exposure per image.
    image = 1.0 - np.exp(-1.2 * np.clip(attenuation, 0.0, None))
    image = image / (1.0 - np.exp(-1.2 * 1.6))
    image = np.clip(gain * image + offset, 0.0, 1.0) ** gamma
    # Detector unsharpness, then quantum noise. PIL blurs only integer images, hence the 8-bit round trip.
    image8 = Image.fromarray(np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    sigma = detector_rng.uniform(0.0, 0.8) * size / 128
    blurred = np.asarray(image8.filter(ImageFilter.GaussianBlur(sigma)), np.float32)
    noise_sigma = detector_rng.uniform(2.0, 6.0)  # in 8-bit grey levels
    noisy = blurred + noise_sigma * detector_rng.standard_normal(blurred.shape, dtype=np.float32)
    return np.clip(noisy + 0.5, 0, 255).astype(np.uint8), label

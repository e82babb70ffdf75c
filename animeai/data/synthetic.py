"""Deterministic procedural "anime character" images written as a folder dataset.

Each class is a character with a fixed visual signature (hair colour and style, eye colour, face shape,
skin tone, accessory); every image varies background, scale, position, rotation, flip, brightness, gaze
and mouth. The result is a small, learnable but non-trivial classification task that needs no real data::

    python -m animeai.data.synthetic data/synthetic --num-classes 6 --images-per-class 40 --val-fraction 0.2

With ``captions=True`` (``animeai synth --captions``) every image also gets Danbooru-style attribute tags in a
sidecar ``<name>_0001.txt`` (for fusion), with realistic noise, and the characters come in designed groups of six:
two *image twins* (drawn identically; only a non-visual tag such as ``idol`` or ``witch`` tells them apart), two
*text twins* (the same tags, told apart only by what the tags do not describe: hair style, face shape, skin), and
two distinct characters. See :func:`caption_plan`.

Layout: ``<out>/<name>/<name>_0001.jpg`` or, with ``val_fraction > 0``, ``<out>/train/<name>/...`` and
``<out>/val/<name>/...`` (validation images continue the numbering, so file names are unique per class).
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

__all__ = [
    "ACCESSORIES",
    "CHARACTER_NAMES",
    "FACE_SHAPES",
    "HAIR_STYLES",
    "CharacterSpec",
    "character_specs",
    "main",
    "make_synthetic_dataset",
    "render_character",
]

RGB = tuple[int, int, int]

FACE_SHAPES: tuple[str, ...] = ("round", "oval", "pointed")
HAIR_STYLES: tuple[str, ...] = ("bob", "long", "twin_tails", "spiky")
ACCESSORIES: tuple[str, ...] = ("none", "ribbon", "hat", "glasses", "cat_ears", "horns")

# Index 11 is the single non-ASCII name: datasets with <= 11 classes stay ASCII-only.
CHARACTER_NAMES: tuple[str, ...] = (
    "akari", "botan", "chiyo", "daichi", "emi", "fuyu", "hana", "ichika", "jun", "kaede", "kira", "ゆき",
    "mio", "nao", "rin", "sora", "tsubaki", "umi", "yuna", "ren", "kenta", "momiji", "shiro", "aoi",
)  # fmt: skip

_SKIN_TONES: tuple[RGB, ...] = (
    (255, 228, 206),
    (241, 196, 160),
    (255, 238, 228),
    (222, 170, 128),
    (190, 132, 96),
)
_GOLDEN = 0.6180339887498949
_LAYER_ASPECT = 1.6  # character layer height / width (head in the top part, torso below)
_PIVOT_Y = 0.46  # head centre height in the layer, as a fraction of the layer width
_SUPERSAMPLE_LIMIT = 384  # draw at 2x below this output size, 1x above (speed)


@dataclass(frozen=True)
class CharacterSpec:
    """Fixed visual signature of one character class."""

    name: str
    hair: RGB
    eyes: RGB
    skin: RGB
    face: str
    hair_style: str
    accessory: str


# --------------------------------------------------------------------------------------------- specs


def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (round(r * 255), round(g * 255), round(b * 255))


def _shade(c: RGB, f: float) -> RGB:
    """Multiply a colour by ``f`` (darken < 1 < lighten towards white)."""
    if f <= 1.0:
        return (round(c[0] * f), round(c[1] * f), round(c[2] * f))
    t = min(f - 1.0, 1.0)
    return (round(c[0] + (255 - c[0]) * t), round(c[1] + (255 - c[1]) * t), round(c[2] + (255 - c[2]) * t))


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return (round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t), round(a[2] + (b[2] - a[2]) * t))


def _valid_name(name: str) -> bool:
    bad = set('/\\:*?"<>|\0')
    return bool(name) and name == name.strip() and name not in {".", ".."} and not (set(name) & bad)


def _spec_for_index(i: int, name: str, seed: int) -> CharacterSpec:
    """Signature of class ``i``; independent of how many classes are requested (prefix-stable)."""
    rng = random.Random(f"animeai-specs/{seed}")
    hue0 = rng.random()
    faces = list(FACE_SHAPES)
    styles = list(HAIR_STYLES)
    accs = list(ACCESSORIES)
    skins = list(_SKIN_TONES)
    for lst in (faces, styles, accs, skins):
        rng.shuffle(lst)
    cycle = i // 12
    hair_hue = hue0 + i * _GOLDEN + (0.5 * _GOLDEN / 12 if cycle % 2 else 0.0)
    hair = _hsv(hair_hue, 0.62 + 0.2 * ((i * 7) % 3) / 2, (0.92, 0.62, 0.78)[(i + cycle) % 3])
    eye_hue = hue0 + 0.41 + i * (1 - _GOLDEN) * 1.7
    eyes = _hsv(eye_hue, 0.85, 0.85 if i % 2 else 0.7)
    # i % 12 fixes (face, style) uniquely (lcm(3, 4) = 12); later cycles shift style/accessory.
    return CharacterSpec(
        name=name,
        hair=hair,
        eyes=eyes,
        skin=skins[(i * 2 + cycle) % len(skins)],
        face=faces[i % 3],
        hair_style=styles[(i + cycle) % 4],
        accessory=accs[(i + 2 * cycle) % 6],
    )


def character_specs(num_classes: int, seed: int = 0) -> list[CharacterSpec]:
    """Return the first ``num_classes`` character signatures (deterministic, maximally distinct first)."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if num_classes > len(CHARACTER_NAMES):
        raise ValueError(
            f"num_classes={num_classes} exceeds the {len(CHARACTER_NAMES)} built-in characters; "
            "pass explicit names to make_synthetic_dataset for more classes"
        )
    return [_spec_for_index(i, CHARACTER_NAMES[i], seed) for i in range(num_classes)]


def _accent(spec: CharacterSpec) -> RGB:
    """Accessory / clothing accent colour derived from the signature (complement of the hair hue)."""
    h, _, _ = colorsys.rgb_to_hsv(*(c / 255 for c in spec.hair))
    return _hsv(h + 0.5, 0.75, 0.88)


# ------------------------------------------------------------------------------------------ drawing


def _pastel(rng: random.Random) -> RGB:
    if rng.random() < 0.2:  # occasional dark / night background
        return _hsv(rng.random(), rng.uniform(0.2, 0.6), rng.uniform(0.15, 0.4))
    return _hsv(rng.random(), rng.uniform(0.05, 0.45), rng.uniform(0.7, 1.0))


def _background(rng: random.Random, size: int) -> Image.Image:
    kind = rng.choice(("solid", "gradient", "shapes"))
    c1 = _pastel(rng)
    if kind == "solid":
        return Image.new("RGB", (size, size), c1)
    if kind == "gradient":
        c2 = _pastel(rng)
        ang = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
        t = (xx * math.cos(ang) + yy * math.sin(ang)) / 1.42 + 0.5  # 0..1 along a random direction
        mask = Image.fromarray(np.clip(t * 255.0, 0, 255).astype(np.uint8))
        return Image.composite(Image.new("RGB", (size, size), c2), Image.new("RGB", (size, size), c1), mask)
    img = Image.new("RGB", (size, size), c1)
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 9)):
        col = _pastel(rng)
        x, y = rng.uniform(-0.2, 1.0) * size, rng.uniform(-0.2, 1.0) * size
        w, h = rng.uniform(0.08, 0.5) * size, rng.uniform(0.08, 0.5) * size
        shape = rng.randrange(3)
        if shape == 0:
            d.ellipse((x, y, x + w, y + h), fill=col)
        elif shape == 1:
            d.rectangle((x, y, x + w, y + h), fill=col)
        else:
            d.polygon([(x, y + h), (x + w / 2, y), (x + w, y + h)], fill=col)
    return img


def _face_polygon(
    spec: CharacterSpec, cx: float, cy: float, u: float
) -> tuple[list[tuple[float, float]], float, float]:
    """Face outline points plus (half width, half height) of the head in pixels."""
    rx, ry, jaw, chin = {"round": (0.25, 0.245, 0.12, 0.0), "oval": (0.215, 0.28, 0.22, 0.03)}.get(
        spec.face, (0.235, 0.26, 0.5, 0.08)
    )
    pts = []
    for k in range(64):
        t = 2 * math.pi * k / 64
        s, c = math.sin(t), math.cos(t)
        if s > 0:  # lower half: narrow the jaw, extend the chin
            x = cx + rx * u * c * (1 - jaw * s**1.5)
            y = cy + ry * u * s * (1 + chin * s**8)
        else:
            x, y = cx + rx * u * c, cy + ry * u * s
        pts.append((x, y))
    return pts, rx * u, ry * u


def _arc_points(
    cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 24
) -> list[tuple[float, float]]:
    return [
        (
            cx + rx * math.cos(math.radians(a0 + (a1 - a0) * k / n)),
            cy + ry * math.sin(math.radians(a0 + (a1 - a0) * k / n)),
        )
        for k in range(n + 1)
    ]


def _draw_character(spec: CharacterSpec, rng: random.Random, u: int) -> Image.Image:
    """Draw the character on a transparent RGBA layer ``u`` wide; the torso runs down to its bottom edge."""
    layer_h = round(u * _LAYER_ASPECT)
    layer = Image.new("RGBA", (u, layer_h), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    cx, cy = 0.5 * u, _PIVOT_Y * u
    lw = max(1, round(u * 0.007))
    hair, hair_dark, hair_light = spec.hair, _shade(spec.hair, 0.6), _shade(spec.hair, 1.35)
    skin, skin_dark = spec.skin, _shade(spec.skin, 0.72)
    accent = _accent(spec)
    face_pts, rx, ry = _face_polygon(spec, cx, cy, u)
    cap_rx, cap_ry, cap_cy = rx * 1.14, ry * 1.08, cy - ry * 0.06
    style, acc = spec.hair_style, spec.accessory

    # -- things behind the head: ears / horns, back hair, tails, body
    if acc == "cat_ears":
        for side in (-1, 1):
            bx = cx + side * rx * 0.62
            tri = [
                (bx - rx * 0.38, cap_cy - cap_ry * 0.55),
                (bx + side * rx * 0.22, cap_cy - cap_ry * 1.45),
                (bx + rx * 0.38, cap_cy - cap_ry * 0.55),
            ]
            d.polygon(tri, fill=hair, outline=hair_dark, width=lw)
            inner = [
                (bx - rx * 0.2, cap_cy - cap_ry * 0.7),
                (bx + side * rx * 0.17, cap_cy - cap_ry * 1.25),
                (bx + rx * 0.2, cap_cy - cap_ry * 0.7),
            ]
            d.polygon(inner, fill=(255, 170, 190))
    elif acc == "horns":
        for side in (-1, 1):
            bx = cx + side * rx * 0.5
            horn = [
                (bx - rx * 0.2, cap_cy - cap_ry * 0.6),
                (bx + side * rx * 0.05, cap_cy - cap_ry * 1.25),
                (bx + side * rx * 0.45, cap_cy - cap_ry * 1.7),
                (bx + side * rx * 0.3, cap_cy - cap_ry * 1.2),
                (bx + rx * 0.2, cap_cy - cap_ry * 0.6),
            ]
            d.polygon(horn, fill=(238, 228, 205), outline=(90, 70, 60), width=lw)

    if style == "long":
        d.rounded_rectangle(
            (cx - cap_rx * 1.05, cap_cy, cx + cap_rx * 1.05, cy + ry * 2.6),
            radius=rx * 0.5,
            fill=hair,
            outline=hair_dark,
            width=lw,
        )
    elif style == "bob":
        d.rounded_rectangle(
            (cx - cap_rx * 1.02, cap_cy, cx + cap_rx * 1.02, cy + ry * 0.95),
            radius=rx * 0.25,
            fill=hair,
            outline=hair_dark,
            width=lw,
        )
    elif style == "twin_tails":
        for side in (-1, 1):
            tx = cx + side * cap_rx * 1.05
            d.ellipse(
                (tx - rx * 0.42, cy - ry * 0.75, tx + rx * 0.42, cy + ry * 2.3), fill=hair, outline=hair_dark, width=lw
            )
            d.ellipse(
                (tx - rx * 0.16, cy - ry * 0.95, tx + rx * 0.16, cy - ry * 0.62),
                fill=accent,
                outline=_shade(accent, 0.6),
                width=lw,
            )
    elif style == "spiky":
        spikes = []
        for k in range(15):
            a = math.radians(160 + 220 * k / 14)
            r = 1.45 if k % 2 else 1.0
            spikes.append((cx + cap_rx * r * math.cos(a), cap_cy + cap_ry * r * math.sin(a)))
        d.polygon(spikes, fill=hair, outline=hair_dark, width=lw)
    d.ellipse((cx - cap_rx, cap_cy - cap_ry, cx + cap_rx, cap_cy + cap_ry), fill=hair, outline=hair_dark, width=lw)

    shirt = _shade(spec.eyes, 0.55)
    neck_w = rx * 0.28
    d.rectangle((cx - neck_w, cy + ry * 0.6, cx + neck_w, cy + ry * 1.45), fill=skin_dark)
    d.rounded_rectangle(
        (cx - rx * 1.5, cy + ry * 1.3, cx + rx * 1.5, layer_h + u),
        radius=rx,
        fill=shirt,
        outline=_shade(shirt, 0.6),
        width=lw,
    )
    d.polygon(
        [(cx - neck_w * 1.6, cy + ry * 1.33), (cx, cy + ry * 1.75), (cx + neck_w * 1.6, cy + ry * 1.33)],
        fill=(245, 245, 245),
    )

    # -- face
    d.polygon(face_pts, fill=skin, outline=skin_dark, width=lw)

    # -- fringe (bangs) over the forehead
    fringe_y = cy - ry * 0.3
    top = _arc_points(cx, cap_cy, cap_rx, cap_ry, 185, 355)
    if style == "bob":
        teeth = 9
        low = [(cx + cap_rx * (1 - 2 * k / teeth), fringe_y + (ry * 0.06 if k % 2 else 0.0)) for k in range(teeth + 1)]
        d.polygon(top + low, fill=hair, outline=hair_dark, width=lw)
        for side in (-1, 1):  # side locks
            x0, x1 = sorted((cx + side * rx * 1.02, cx + side * rx * 0.7))
            d.polygon(
                [(x0, cap_cy), (x1, cap_cy), ((x0 + x1) / 2, cy + ry * 0.65)], fill=hair, outline=hair_dark, width=lw
            )
    elif style == "spiky":
        pts = []
        for k in range(7):
            x = cx + cap_rx * (1 - 2 * k / 6)
            pts.append((x, fringe_y - ry * 0.25 if k % 2 == 0 else fringe_y + ry * 0.12))
        d.polygon(top + pts, fill=hair, outline=hair_dark, width=lw)
    elif style == "twin_tails":  # centre parting
        part = [
            (cx + cap_rx, cy - ry * 0.05),
            (cx + rx * 0.55, fringe_y),
            (cx + rx * 0.08, cy - ry * 0.78),
            (cx - rx * 0.08, cy - ry * 0.78),
            (cx - rx * 0.55, fringe_y),
            (cx - cap_rx, cy - ry * 0.05),
        ]
        d.polygon(top + part, fill=hair, outline=hair_dark, width=lw)
    else:  # long: side-swept fringe with three points plus long front strands
        pts = [
            (cx + cap_rx, cy + ry * 0.1),
            (cx + rx * 0.6, fringe_y - ry * 0.1),
            (cx + rx * 0.35, fringe_y + ry * 0.12),
            (cx + rx * 0.05, fringe_y - ry * 0.15),
            (cx - rx * 0.3, fringe_y + ry * 0.1),
            (cx - rx * 0.6, fringe_y - ry * 0.2),
            (cx - cap_rx, cy + ry * 0.1),
        ]
        d.polygon(top + pts, fill=hair, outline=hair_dark, width=lw)
        for side in (-1, 1):
            x0 = cx + side * rx * 1.0
            d.polygon(
                [(x0, cy - ry * 0.2), (x0 - side * rx * 0.22, cy - ry * 0.2), (x0 - side * rx * 0.08, cy + ry * 1.1)],
                fill=hair,
                outline=hair_dark,
                width=lw,
            )
    # hair shine
    d.arc(
        (cx - cap_rx * 0.7, cap_cy - cap_ry * 0.8, cx + cap_rx * 0.7, cap_cy + cap_ry * 0.2),
        200,
        250,
        fill=hair_light,
        width=max(1, lw * 2),
    )

    # -- eyes
    ey = cy + ry * 0.12
    ew, eh = rx * 0.24, ry * 0.24
    gx, gy = rng.uniform(-0.3, 0.3) * ew, rng.uniform(-0.15, 0.15) * eh
    iris_dark = _shade(spec.eyes, 0.45)
    for side in (-1, 1):
        ex = cx + side * rx * 0.42
        d.ellipse((ex - ew, ey - eh, ex + ew, ey + eh), fill=(255, 255, 255))
        iw, ih = ew * 0.68, eh * 0.88
        ix, iy = ex + gx, ey + gy
        d.ellipse((ix - iw, iy - ih, ix + iw, iy + ih), fill=spec.eyes, outline=iris_dark, width=lw)
        d.ellipse((ix - iw * 0.45, iy - ih * 0.45, ix + iw * 0.45, iy + ih * 0.45), fill=iris_dark)
        hl = iw * 0.32
        d.ellipse(
            (ix - iw * 0.55 - hl, iy - ih * 0.55 - hl, ix - iw * 0.55 + hl, iy - ih * 0.55 + hl), fill=(255, 255, 255)
        )
        d.arc((ex - ew * 1.1, ey - eh * 1.05, ex + ew * 1.1, ey + eh * 1.3), 190, 350, fill=(40, 30, 35), width=lw * 3)
        bx = ex + side * ew * 0.1
        d.line([(bx - ew, ey - eh * 1.75), (bx + ew, ey - eh * 1.75 - side * eh * 0.12)], fill=hair_dark, width=lw * 2)

    # -- nose, blush, mouth
    d.line([(cx, cy + ry * 0.38), (cx - rx * 0.03, cy + ry * 0.44)], fill=skin_dark, width=lw)
    if rng.random() < 0.5:
        blush = _mix(skin, (255, 120, 140), 0.35)
        for side in (-1, 1):
            bx = cx + side * rx * 0.52
            d.ellipse((bx - ew * 0.7, ey + eh * 1.4, bx + ew * 0.7, ey + eh * 1.9), fill=blush)
    my, mw = cy + ry * 0.62, rx * 0.17
    mouth = rng.choice(("smile", "open", "flat", "o", "cat", "frown"))
    lip = (120, 40, 50)
    if mouth == "smile":
        d.arc((cx - mw, my - mw * 0.8, cx + mw, my + mw * 0.6), 20, 160, fill=lip, width=lw * 2)
    elif mouth == "open":
        d.pieslice((cx - mw, my - mw * 0.7, cx + mw, my + mw * 0.9), 0, 180, fill=(150, 40, 55), outline=lip, width=lw)
    elif mouth == "flat":
        d.line([(cx - mw * 0.6, my), (cx + mw * 0.6, my)], fill=lip, width=lw * 2)
    elif mouth == "o":
        d.ellipse((cx - mw * 0.35, my - mw * 0.4, cx + mw * 0.35, my + mw * 0.4), fill=(150, 40, 55))
    elif mouth == "cat":
        for side in (-1, 1):
            d.arc(
                (cx + min(0, side) * mw, my - mw * 0.5, cx + max(0, side) * mw, my + mw * 0.3),
                10,
                170,
                fill=lip,
                width=lw * 2,
            )
    else:
        d.arc((cx - mw * 0.8, my, cx + mw * 0.8, my + mw), 200, 340, fill=lip, width=lw * 2)

    # -- front accessories
    if acc == "glasses":
        frame = (35, 35, 45)
        for side in (-1, 1):
            ex = cx + side * rx * 0.42
            d.ellipse((ex - ew * 1.4, ey - eh * 1.35, ex + ew * 1.4, ey + eh * 1.35), outline=frame, width=lw * 2)
        d.line([(cx - rx * 0.42 + ew * 1.4, ey), (cx + rx * 0.42 - ew * 1.4, ey)], fill=frame, width=lw * 2)
    elif acc == "hat":
        brim_y = cap_cy - cap_ry * 0.55
        d.polygon(
            [
                (cx - cap_rx * 0.75, brim_y),
                (cx - cap_rx * 0.55, brim_y - cap_ry * 1.0),
                (cx + cap_rx * 0.55, brim_y - cap_ry * 1.0),
                (cx + cap_rx * 0.75, brim_y),
            ],
            fill=accent,
            outline=_shade(accent, 0.6),
            width=lw,
        )
        d.rectangle(
            (cx - cap_rx * 0.72, brim_y - cap_ry * 0.3, cx + cap_rx * 0.72, brim_y - cap_ry * 0.12),
            fill=_shade(accent, 0.55),
        )
        d.ellipse(
            (cx - cap_rx * 1.45, brim_y - cap_ry * 0.18, cx + cap_rx * 1.45, brim_y + cap_ry * 0.22),
            fill=accent,
            outline=_shade(accent, 0.6),
            width=lw,
        )
    elif acc == "ribbon":
        rxc, ryc, s = cx + cap_rx * 0.55, cap_cy - cap_ry * 0.78, rx * 0.38
        col, dark = (225, 40, 70), (140, 20, 40)
        d.polygon([(rxc, ryc), (rxc - s, ryc - s * 0.7), (rxc - s, ryc + s * 0.7)], fill=col, outline=dark, width=lw)
        d.polygon([(rxc, ryc), (rxc + s, ryc - s * 0.7), (rxc + s, ryc + s * 0.7)], fill=col, outline=dark, width=lw)
        d.ellipse((rxc - s * 0.25, ryc - s * 0.25, rxc + s * 0.25, ryc + s * 0.25), fill=dark)
    return layer


def render_character(spec: CharacterSpec, rng: random.Random, image_size: int = 128) -> Image.Image:
    """Render one randomised RGB image of ``spec`` (all randomness drawn from ``rng``)."""
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    ss = 2 if image_size < _SUPERSAMPLE_LIMIT else 1
    size = image_size * ss
    canvas = _background(rng, size)
    layer = _draw_character(spec, rng, size)
    if rng.random() < 0.5:
        layer = ImageOps.mirror(layer)
    # one affine warp = rotation about the neck/head pivot + scaling + translation onto the canvas
    theta = math.radians(rng.uniform(-20.0, 20.0))
    scale = rng.uniform(0.6, 1.0)
    sub = size * scale
    slack = (size - sub) / 2
    jitter = 0.08 * size
    px, py = size / 2, size * _PIVOT_Y  # pivot in layer coordinates
    out_x = px * scale + slack + rng.uniform(-slack - jitter, slack + jitter)
    out_y = py * scale + slack + rng.uniform(-slack - jitter, slack + jitter * 0.5)
    out_y = max(out_y, size - sub * (_LAYER_ASPECT - _PIVOT_Y - 0.16))  # torso's cut-off edge stays below the frame
    cos_s, sin_s = math.cos(theta) / scale, math.sin(theta) / scale
    a, b, d, e = cos_s, sin_s, -sin_s, cos_s  # output -> layer (inverse map)
    coeffs = (a, b, px - a * out_x - b * out_y, d, e, py - d * out_x - e * out_y)
    layer = layer.convert("RGBa").transform((size, size), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
    layer = layer.convert("RGBA")
    canvas.paste(layer, (0, 0), layer)
    canvas = ImageEnhance.Brightness(canvas).enhance(rng.uniform(0.85, 1.15))
    if ss != 1:
        canvas = canvas.reduce(ss)
    return canvas


# ------------------------------------------------------------------------------------------ captions

# Non-visual "character tags": what an image cannot show (role, job, club). One per built-in character.
LORE_TAGS: tuple[str, ...] = (
    "idol", "swordswoman", "shrine_maiden", "student_council", "detective", "pianist", "witch", "pilot", "baker",
    "archer", "ninja", "astronomer", "librarian", "gardener", "knight", "painter", "sailor", "chef", "dancer",
    "inventor", "florist", "boxer", "violinist", "healer",
)  # fmt: skip
_ACCESSORY_TAGS = {"ribbon": "hair_ribbon", "hat": "hat", "glasses": "glasses", "cat_ears": "cat_ears",
                   "horns": "horns", "none": None}
_COLOUR_WORDS = ("red", "orange", "yellow", "green", "aqua", "blue", "purple", "pink")
_GENERIC_TAGS = ("1girl", "solo", "smile", "looking_at_viewer", "upper_body", "simple_background", "blush",
                 "open_mouth", "portrait")
# Caption noise: an image without any caption; each tag missing; each tag replaced by a wrong one of its kind.
CAPTION_NOISE = {"no_caption": 0.1, "missing_tag": 0.2, "wrong_tag": 0.1}


def colour_word(c: RGB) -> str:
    """A coarse colour name of an RGB colour, as a tagger would write it."""
    h, s, v = colorsys.rgb_to_hsv(*(x / 255 for x in c))
    if v < 0.25:
        return "black"
    if s < 0.2:
        return "white" if v > 0.8 else "grey"
    bounds = (0.04, 0.11, 0.19, 0.45, 0.53, 0.69, 0.82, 0.94)
    for word, upper in zip(_COLOUR_WORDS, bounds):
        if h < upper:
            return word
    return "red"


def caption_plan(num_classes: int) -> dict[str, list[list[int]]]:
    """Class ids in groups of six: (0, 1) image twins, (2, 3) text twins, (4, 5) distinct; and so on."""
    plan: dict[str, list[list[int]]] = {"image_twins": [], "text_twins": []}
    for g in range(0, num_classes, 6):
        for kind, first in (("image_twins", g), ("text_twins", g + 2)):
            if first + 1 < num_classes:
                plan[kind].append([first, first + 1])
    return plan


def _captioned_specs(specs: list[CharacterSpec]) -> list[CharacterSpec]:
    """The signatures of a captioned set: image twins share the first one's look; text twins share hair and eye
    colour and accessory (what the tags describe) but keep their own hair style, face and skin."""
    out = list(specs)
    plan = caption_plan(len(specs))
    for a, b in plan["image_twins"]:
        s = specs[a]
        out[b] = CharacterSpec(specs[b].name, s.hair, s.eyes, s.skin, s.face, s.hair_style, s.accessory)
    for a, b in plan["text_twins"]:
        s, t = specs[a], specs[b]
        out[b] = CharacterSpec(t.name, s.hair, s.eyes, t.skin, t.face, t.hair_style, s.accessory)
    return out


def character_tags(specs: list[CharacterSpec]) -> list[list[str]]:
    """The true tags of each character of a captioned set: hair colour, eye colour, accessory, one lore tag (text
    twins share the first twin's lore tag, so their tags are identical)."""
    lore = [LORE_TAGS[i % len(LORE_TAGS)] for i in range(len(specs))]
    for a, b in caption_plan(len(specs))["text_twins"]:
        lore[b] = lore[a]
    tags = []
    for spec, role in zip(specs, lore):
        t = [f"{colour_word(spec.hair)}_hair", f"{colour_word(spec.eyes)}_eyes", _ACCESSORY_TAGS[spec.accessory], role]
        tags.append([x for x in t if x])
    return tags


def noisy_caption(tags: list[str], rng: random.Random, vocab: dict[str, list[str]]) -> str | None:
    """One image's caption: each tag missing or replaced by a wrong tag of its kind (``CAPTION_NOISE``), plus up to
    two generic tags, shuffled; ``None`` for an image without any caption."""
    if rng.random() < CAPTION_NOISE["no_caption"]:
        return None
    out = []
    for tag in tags:
        if rng.random() < CAPTION_NOISE["missing_tag"]:
            continue
        if rng.random() < CAPTION_NOISE["wrong_tag"]:
            kind = next((k for k, words in vocab.items() if tag in words), None)
            others = [w for w in vocab.get(kind, []) if w != tag]
            if others:
                tag = rng.choice(others)
        out.append(tag)
    out += rng.sample(_GENERIC_TAGS, rng.randint(0, 2))
    rng.shuffle(out)
    return ", ".join(out)


def _tag_vocab(all_tags: list[list[str]]) -> dict[str, list[str]]:
    vocab: dict[str, list[str]] = {"hair": [], "eyes": [], "accessory": [], "lore": []}
    for tags in all_tags:
        for t in tags:
            kind = ("hair" if t.endswith("_hair") else "eyes" if t.endswith("_eyes") else "accessory"
                    if t in _ACCESSORY_TAGS.values() else "lore")
            if t not in vocab[kind]:
                vocab[kind].append(t)
    vocab["hair"] = sorted(set(vocab["hair"]) | {f"{w}_hair" for w in _COLOUR_WORDS})
    vocab["eyes"] = sorted(set(vocab["eyes"]) | {f"{w}_eyes" for w in _COLOUR_WORDS})
    vocab["accessory"] = sorted({t for t in _ACCESSORY_TAGS.values() if t})
    return vocab


# ------------------------------------------------------------------------------------------ dataset


MANIFEST_NAME = ".animeai-synthetic.json"
"""Written into ``out_dir`` first: the parameters of the synthetic set (a hidden file, so never read as data)."""

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 4096


def _check_int(value: object, name: str, flag: str, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``, else ValueError naming the parameter and its CLI flag."""
    span = f">= {low}" if high is None else f"between {low} and {high}"
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ValueError(f"{name} ({flag}) must be an integer {span}, got {value!r}")
    return value


def _check_out_dir(root: Path, params: dict) -> None:
    """Refuse an output folder that is a file or already holds data other than this very synthetic set."""
    for p in (root, *root.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                what = "exists and is not a folder" if p == root else f"cannot be created: {p} is not a folder"
                raise FileExistsError(f"output folder {root} {what}")
            break
    if not root.is_dir():
        return
    manifest = root / MANIFEST_NAME
    if manifest.is_file():
        try:
            previous = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if previous == params:
            return  # the same set again: its files are rewritten (identical bytes), other files are left alone
        if isinstance(previous, dict):
            diff = ", ".join(
                f"{k} {previous.get(k)!r} there, {v!r} now" for k, v in params.items() if previous.get(k) != v
            )
        else:
            diff = f"unreadable {MANIFEST_NAME}"
        raise FileExistsError(
            f"output folder {root} already holds a synthetic dataset made with other parameters ({diff}); "
            "refusing to mix datasets (choose an empty folder or delete it first)"
        )
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        data = [f for f in filenames if not f.startswith(".")]
        if data:
            raise FileExistsError(
                f"output folder {root} already contains files (e.g. {Path(dirpath) / data[0]}); refusing to mix "
                "datasets (choose an empty folder or delete it first)"
            )


def make_synthetic_dataset(
    out_dir: str | os.PathLike[str],
    num_classes: int = 6,
    images_per_class: int = 40,
    image_size: int = 128,
    seed: int = 0,
    val_fraction: float = 0.0,
    names: list[str] | None = None,
    captions: bool = False,
) -> list[str]:
    """Write the dataset and return class names (sorted).

    ``captions``: also write a noisy tag caption ``<image>.txt`` beside each image (some images get none) and draw
    the characters as :func:`caption_plan` designs them (image twins, text twins, distinct characters); the plan
    and each character's true tags go into the manifest ``out_dir/.animeai-synthetic.json``.

    With ``val_fraction > 0`` write ``out_dir/train/<name>/`` and ``out_dir/val/<name>/`` (val gets
    ``round(images_per_class * val_fraction)``, at least 1); else ``out_dir/<name>/`` directly.
    Deterministic: same args -> byte-identical files. Character identities do not depend on ``seed``
    (it only drives per-image variation), so datasets made with different seeds share classes.
    ``names`` overrides the built-in names (``len(names) == num_classes``; may exceed the built-in count).

    Limits (``ValueError`` naming the parameter and its ``animeai synth`` flag): 2 <= ``num_classes`` <= the
    built-in names (unless ``names``), ``images_per_class`` >= 1 (>= 2 with ``val_fraction > 0``), 16 <=
    ``image_size`` <= 4096, 0 <= ``val_fraction`` < 1.

    Existing output: ``out_dir`` may be missing or hold no visible file. It may also hold an earlier synthetic
    set made with exactly the same parameters (recorded in ``out_dir/.animeai-synthetic.json``, written before
    any image): then its files are rewritten with identical bytes, which also completes an interrupted run;
    files it did not write are left alone. Anything else (a file, other data, a synthetic set with other
    parameters) raises ``FileExistsError`` naming the folder, before anything is written.
    """
    max_classes = len(CHARACTER_NAMES) if names is None else None
    _check_int(num_classes, "num_classes", "--num-classes", 2, max_classes)
    _check_int(images_per_class, "images_per_class", "--images-per-class", 1)
    _check_int(image_size, "image_size", "--image-size", MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed (--seed) must be an integer, got {seed!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction (--val-fraction) must be in [0, 1), got {val_fraction!r}")
    if val_fraction > 0 and images_per_class < 2:
        raise ValueError(
            f"images_per_class (--images-per-class) must be >= 2 with val_fraction > 0 (one training and one "
            f"validation image per class), got {images_per_class}; or set --val-fraction 0"
        )
    if names is None:
        specs = character_specs(num_classes)
    else:
        names = list(names)
        if len(names) != num_classes:
            raise ValueError(f"len(names)={len(names)} must equal num_classes={num_classes}")
        if len(set(names)) != len(names):
            raise ValueError(f"names must be unique, got {names!r}")
        specs = [_spec_for_index(i, n, 0) for i, n in enumerate(names)]
    if captions:
        specs = _captioned_specs(specs)
    for spec in specs:
        if not _valid_name(spec.name):
            raise ValueError(f"invalid class name for a folder: {spec.name!r}")

    n_val = max(1, round(images_per_class * val_fraction)) if val_fraction > 0 else 0
    n_train = images_per_class - n_val
    if n_train < 1:  # cannot happen after the checks above; kept as a guard
        raise ValueError(
            f"val_fraction={val_fraction} leaves no training images out of images_per_class={images_per_class}"
        )
    root = Path(out_dir)
    params = {
        "generator": "animeai.data.synthetic", "names": [s.name for s in specs], "images_per_class": images_per_class,
        "image_size": image_size, "seed": seed, "val_fraction": float(val_fraction),
    }
    tags: list[list[str]] = []
    if captions:
        tags = character_tags(specs)
        plan = caption_plan(len(specs))
        params["captions"] = {
            "noise": dict(CAPTION_NOISE), "tags": {s.name: t for s, t in zip(specs, tags)},
            **{k: [[specs[a].name, specs[b].name] for a, b in v] for k, v in plan.items()},
        }
    vocab = _tag_vocab(tags)
    _check_out_dir(root, params)  # refuse up front, so nothing is half-written
    splits: list[tuple[str, Path, int, int]]  # (split, root, first index, count)
    if n_val:
        splits = [("train", root / "train", 1, n_train), ("val", root / "val", n_train + 1, n_val)]
    else:
        splits = [("all", root, 1, n_train)]

    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST_NAME).write_text(json.dumps(params, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for split, split_root, first, count in splits:
        for ci, spec in enumerate(specs):
            cdir = split_root / spec.name
            cdir.mkdir(parents=True, exist_ok=True)
            for idx in range(first, first + count):
                rng = random.Random(f"animeai-synthetic/{seed}/{split}/{spec.name}/{idx}")
                img = render_character(spec, rng, image_size)
                img.save(cdir / f"{spec.name}_{idx:04d}.jpg", format="JPEG", quality=90)
                if captions:
                    text = noisy_caption(tags[ci], random.Random(f"animeai-captions/{seed}/{split}/{spec.name}/{idx}"),
                                         vocab)
                    if text is not None:
                        (cdir / f"{spec.name}_{idx:04d}.txt").write_text(text + "\n", encoding="utf-8")
    return sorted(s.name for s in specs)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m animeai.data.synthetic OUT [--num-classes N] ...``."""
    p = argparse.ArgumentParser(prog="python -m animeai.data.synthetic", description=(__doc__ or "").split("\n", 1)[0])
    p.add_argument("out", help="output folder")
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--images-per-class", type=int, default=40)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.0)
    args = p.parse_args(argv)
    try:
        classes = make_synthetic_dataset(
            args.out,
            num_classes=args.num_classes,
            images_per_class=args.images_per_class,
            image_size=args.image_size,
            seed=args.seed,
            val_fraction=args.val_fraction,
        )
    except (ValueError, OSError) as e:
        p.error(str(e))
    total = len(classes) * args.images_per_class
    print(
        f"wrote {len(classes)} classes x {args.images_per_class} images ({total} total, "
        f"{args.image_size}px) to {Path(args.out).resolve()}: {', '.join(classes)}"
    )


if __name__ == "__main__":
    main()

"""A procedural street-scene generator: sky, buildings with windows, a road in perspective with
lane marks, sidewalks, grass, trees, poles, cars and people, drawn into the image and the label
map together (so the masks are exact), with colour jitter and noise. Deterministic: the scene is
a pure function of the numpy Generator passed in.

8 classes (fewer than Cityscapes' 19); each uses the colour of the Cityscapes class of that name.
"""
from __future__ import annotations

import numpy as np

SYNTHETIC_CLASSES = ("road", "sidewalk", "building", "pole", "vegetation", "sky", "person", "car")
SYNTHETIC_PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (153, 153, 153),
                     (107, 142, 35), (70, 130, 180), (220, 20, 60), (0, 0, 142))
ROAD, SIDEWALK, BUILDING, POLE, VEGETATION, SKY, PERSON, CAR = range(8)


class _Canvas:
    def __init__(self, h, w, rng):
        self.h, self.w, self.rng = h, w, rng
        self.img = np.zeros((h, w, 3), np.float32)
        self.label = np.zeros((h, w), np.uint8)
        self.yy, self.xx = np.mgrid[0:h, 0:w].astype(np.float32)

    def paint(self, mask, cls, color, texture=0.0):
        """Paints `mask` with class `cls` and an RGB colour (plus optional per-pixel texture)."""
        color = np.asarray(color, np.float32)
        if texture:
            n = int(self.label[mask].size)
            color = color + self.rng.normal(0, texture, (n, 1)).astype(np.float32)
        if isinstance(mask, tuple):  # a rectangle given as slices
            region = self.img[mask]
            self.img[mask] = color.reshape(region.shape) if color.size == region.size else color
        else:
            self.img[mask] = color
        self.label[mask] = cls

    def rect(self, x0, y0, x1, y1):
        """Pixels with x0 <= x < x1 and y0 <= y < y1, as slices (cheaper than a full mask)."""
        def span(a, b, n):
            return slice(int(np.clip(np.ceil(a), 0, n)), int(np.clip(np.ceil(b), 0, n)))
        return span(y0, y1, self.h), span(x0, x1, self.w)

    def ellipse(self, cx, cy, rx, ry):
        return ((self.xx - cx) / max(rx, 0.5)) ** 2 + ((self.yy - cy) / max(ry, 0.5)) ** 2 <= 1


def _jitter(rng, base, amount=25):
    return np.clip(np.asarray(base, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def draw_street(size, rng: np.random.Generator):
    """One scene of size (H, W): returns (RGB uint8 HxWx3, label uint8 HxW)."""
    h, w = size
    c = _Canvas(h, w, rng)
    horizon = h * rng.uniform(0.35, 0.5)
    vx = w * rng.uniform(0.35, 0.65)  # vanishing point

    # Sky: a vertical gradient.
    sky_top, sky_bottom = _jitter(rng, (90, 140, 200)), _jitter(rng, (170, 200, 230))
    t = (c.yy / max(horizon, 1))[..., None]
    c.img[:] = sky_top * (1 - t) + sky_bottom * t
    c.label[:] = SKY

    # Buildings: a row of blocks standing on the horizon, each with a grid of windows.
    x = -rng.uniform(0, w * 0.1)
    while x < w:
        bw = w * rng.uniform(0.08, 0.25)
        if rng.random() < 0.85:
            top = horizon * rng.uniform(0.05, 0.8)
            base = _jitter(rng, rng.choice([(120, 110, 100), (150, 140, 130), (90, 90, 100)]), 30)
            c.paint(c.rect(x, top, x + bw, horizon + 2), BUILDING, base, texture=4)
            win = base * rng.uniform(0.3, 0.6)
            step_x, step_y = max(4.0, bw / rng.integers(2, 6)), max(4.0, h * 0.05)
            for wy in np.arange(top + step_y * 0.4, horizon - step_y * 0.5, step_y):
                for wx in np.arange(x + step_x * 0.3, x + bw - step_x * 0.5, step_x):
                    c.paint(c.rect(wx, wy, wx + step_x * 0.5, wy + step_y * 0.5), BUILDING, win)
        x += bw

    # Ground: grass, then the sidewalk and road trapezoids meeting at the vanishing point.
    below = c.yy >= horizon
    depth = np.maximum(c.yy - horizon, 0)  # grows towards the viewer
    road_half = rng.uniform(0.6, 1.1) * depth
    walk_half = road_half + rng.uniform(0.3, 0.6) * depth
    dx = np.abs(c.xx - vx)
    c.paint(below & (dx >= walk_half), VEGETATION, _jitter(rng, (80, 130, 50)), texture=10)
    c.paint(below & (dx < walk_half) & (dx >= road_half), SIDEWALK,
            _jitter(rng, (185, 175, 170)), texture=6)
    c.paint(below & (dx < road_half), ROAD, _jitter(rng, (80, 80, 85), 15), texture=5)
    # Dashed lane mark in the middle of the road (still road).
    dash = below & (dx < 0.03 * depth + 0.5) & (np.sin(np.log1p(depth) * 9) > 0.2)
    c.paint(dash, ROAD, (235, 235, 225))

    # Objects standing on the ground, drawn far to near; their size grows with depth below the
    # horizon (a pinhole camera over a flat ground plane).
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        objects.append(("tree", rng.uniform(h * 0.1, h - horizon), rng.choice([-1, 1])))
    for _ in range(int(rng.integers(1, 4))):
        objects.append(("pole", rng.uniform(h * 0.1, h - horizon), rng.choice([-1, 1])))
    for _ in range(int(rng.integers(0, 4))):
        objects.append(("person", rng.uniform(h * 0.1, h - horizon), rng.choice([-1, 1])))
    for _ in range(int(rng.integers(1, 4))):
        objects.append(("car", rng.uniform(h * 0.08, h - horizon), rng.uniform(-0.8, 0.8)))
    objects.sort(key=lambda o: o[1])
    for kind, d, side in objects:
        yb = horizon + d  # foot row
        s = d / h  # size scale
        if kind == "car":
            cx = vx + side * d * 0.9
            cw_, ch_ = s * w * 0.35, s * h * 0.28
            color = _jitter(rng, rng.choice([(180, 30, 30), (30, 60, 160), (200, 200, 200),
                                             (40, 40, 40), (220, 180, 40)]), 30)
            c.paint(c.rect(cx - cw_ / 2, yb - ch_ * 0.6, cx + cw_ / 2, yb), CAR, color, 5)
            c.paint(c.rect(cx - cw_ * 0.3, yb - ch_, cx + cw_ * 0.3, yb - ch_ * 0.55), CAR,
                    color * 0.6 + 60)  # cabin, lighter glass
            for wx in (cx - cw_ * 0.3, cx + cw_ * 0.3):
                c.paint(c.ellipse(wx, yb - ch_ * 0.05, cw_ * 0.1, ch_ * 0.12), CAR, (20, 20, 20))
            continue
        # Sidewalk or verge objects stand just outside the road.
        px = vx + side * d * rng.uniform(1.2, 1.7)
        if kind == "pole":
            pw, ph = max(1.0, s * w * 0.015), s * h * 1.6
            c.paint(c.rect(px - pw, yb - ph, px + pw, yb), POLE, _jitter(rng, (120, 120, 120)))
            c.paint(c.rect(px - pw * 4, yb - ph, px + pw, yb - ph + pw * 2), POLE,
                    _jitter(rng, (120, 120, 120)))
        elif kind == "tree":
            tw, th = max(1.0, s * w * 0.02), s * h * 1.2
            c.paint(c.rect(px - tw, yb - th * 0.6, px + tw, yb), VEGETATION,
                    _jitter(rng, (90, 60, 30), 15))
            c.paint(c.ellipse(px, yb - th * 0.75, s * w * 0.12, th * 0.35), VEGETATION,
                    _jitter(rng, (50, 110, 40)), texture=18)
        else:  # person
            pw, ph = s * w * 0.03, s * h * 0.9
            c.paint(c.rect(px - pw, yb - ph * 0.45, px + pw, yb), PERSON,
                    _jitter(rng, (50, 50, 90), 30))  # legs
            c.paint(c.rect(px - pw * 1.2, yb - ph * 0.85, px + pw * 1.2, yb - ph * 0.45),
                    PERSON, _jitter(rng, rng.choice([(200, 40, 40), (40, 150, 60),
                                                     (230, 200, 60)]), 30))  # torso
            c.paint(c.ellipse(px, yb - ph * 0.93, pw * 0.9, ph * 0.09), PERSON,
                    _jitter(rng, (220, 180, 150), 20))  # head

    # Global brightness and sensor noise.
    img = c.img * rng.uniform(0.75, 1.2) + rng.normal(0, 4, c.img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), c.label

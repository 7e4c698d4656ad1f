"""A small vectorised ray caster for the scene world: spheres, cubes, cylinders and cones on a ground plane.

Every pixel's ray is intersected with every object at once (numpy broadcasting over pixels); the
only Python loop is over the 1-3 objects of a scene. Depth is the exact camera-space z of the first hit.
"""

from __future__ import annotations

import numpy as np

SKY_DEPTH = 12.0  # depth given to pixels that hit nothing (the far plane)
_EPS = 1e-4


def camera_rays(size: int, fov_deg: float = 50.0, eye=(0.0, 2.6, -4.6), target=(0.0, 0.3, 1.2)):
    """Ray origins and unit directions for a pinhole camera.

    Returns ``origin`` (3,), ``dirs`` (size*size, 3) and ``forward`` (3,), pixels in row-major order.
    """
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    forward = target - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(np.array([0.0, 1.0, 0.0]), forward)
    right /= np.linalg.norm(right)
    up = np.cross(forward, right)
    half = np.tan(np.radians(fov_deg) / 2)
    coords = (np.arange(size) + 0.5) / size * 2 - 1
    u, v = np.meshgrid(coords * half, -coords * half)  # v: image rows go down
    dirs = forward + u[..., None] * right + v[..., None] * up
    dirs = dirs.reshape(-1, 3)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return eye, dirs, forward


def _smallest_positive(*ts):
    t = np.full_like(ts[0], np.inf)
    for cand in ts:
        t = np.where((cand > _EPS) & (cand < t), cand, t)
    return t


def intersect_sphere(o, d, center, radius):
    """Distances (P,) to a sphere (inf = miss) and the normals (P, 3) at the hits."""
    oc = o - center
    b = d @ oc
    c = oc @ oc - radius**2
    disc = b * b - c
    sq = np.sqrt(np.maximum(disc, 0.0))
    t = _smallest_positive(np.where(disc >= 0, -b - sq, np.inf), np.where(disc >= 0, -b + sq, np.inf))
    hit = o + d * np.where(np.isfinite(t), t, 0.0)[:, None]
    return t, (hit - center) / radius


def intersect_box(o, d, center, half):
    """Axis-aligned cube (slab method)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        t1 = (center - half - o) * inv
        t2 = (center + half - o) * inv
    tmin = np.nanmax(np.minimum(t1, t2), axis=1)
    tmax = np.nanmin(np.maximum(t1, t2), axis=1)
    t = np.where((tmax >= tmin) & (tmax > _EPS), np.where(tmin > _EPS, tmin, tmax), np.inf)
    hit = o + d * np.where(np.isfinite(t), t, 0.0)[:, None]
    rel = (hit - center) / half
    axis = np.argmax(np.abs(rel), axis=1)
    normal = np.zeros_like(hit)
    normal[np.arange(len(hit)), axis] = np.sign(rel[np.arange(len(hit)), axis])
    return t, normal


def intersect_cylinder(o, d, center, radius, height):
    """Vertical cylinder standing on y = center[1] - height/2, with caps."""
    y0, y1 = center[1] - height / 2, center[1] + height / 2
    ox, oz = o[0] - center[0], o[2] - center[2]
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = ox * d[:, 0] + oz * d[:, 2]
    c = ox**2 + oz**2 - radius**2
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        sq = np.sqrt(np.maximum(disc, 0.0))
        ts = [(-b - sq) / a, (-b + sq) / a]
        ts = [np.where((disc >= 0) & (a > 1e-12) & (o[1] + d[:, 1] * t >= y0) & (o[1] + d[:, 1] * t <= y1), t, np.inf)
              for t in ts]
        tcap = (y1 - o[1]) / d[:, 1]
    cap_hit = (ox + d[:, 0] * tcap) ** 2 + (oz + d[:, 2] * tcap) ** 2 <= radius**2
    tcap = np.where(cap_hit, tcap, np.inf)
    t = _smallest_positive(ts[0], ts[1], tcap)
    hit = o + d * np.where(np.isfinite(t), t, 0.0)[:, None]
    side = np.stack([hit[:, 0] - center[0], np.zeros(len(hit)), hit[:, 2] - center[2]], 1) / radius
    normal = np.where((t == tcap)[:, None], np.array([0.0, 1.0, 0.0]), side)
    return t, normal


def intersect_cone(o, d, center, radius, height):
    """Upright cone: base circle of ``radius`` at y = center[1] - height/2, apex above it."""
    base = center[1] - height / 2
    apex = np.array([center[0], base + height, center[2]])
    k = (radius / height) ** 2
    co = o - apex
    a = d[:, 0] ** 2 + d[:, 2] ** 2 - k * d[:, 1] ** 2
    b = d[:, 0] * co[0] + d[:, 2] * co[2] - k * d[:, 1] * co[1]
    c = co[0] ** 2 + co[2] ** 2 - k * co[1] ** 2
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        sq = np.sqrt(np.maximum(disc, 0.0))
        ts = []
        for t in ((-b - sq) / a, (-b + sq) / a):
            y = o[1] + d[:, 1] * t
            ts.append(np.where((disc >= 0) & (np.abs(a) > 1e-12) & (y >= base) & (y <= apex[1]), t, np.inf))
        tbase = (base - o[1]) / d[:, 1]
    base_hit = (o[0] + d[:, 0] * tbase - center[0]) ** 2 + (o[2] + d[:, 2] * tbase - center[2]) ** 2 <= radius**2
    t = _smallest_positive(ts[0], ts[1], np.where(base_hit, tbase, np.inf))
    hit = o + d * np.where(np.isfinite(t), t, 0.0)[:, None]
    rel = hit - apex
    normal = np.stack([rel[:, 0], -k * rel[:, 1], rel[:, 2]], 1)  # gradient of x^2 + z^2 - k y^2
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-9)
    return t, normal


def intersect_object(o, d, obj: dict):
    """Dispatch on ``obj['shape']``; ``obj`` holds ``x``, ``z`` and ``radius`` (the half-extent)."""
    r = obj["radius"]
    shape = obj["shape"]
    if shape == "sphere":
        return intersect_sphere(o, d, np.array([obj["x"], r, obj["z"]]), r)
    if shape == "cube":
        return intersect_box(o, d, np.array([obj["x"], r, obj["z"]]), r)
    if shape == "cylinder":
        return intersect_cylinder(o, d, np.array([obj["x"], r * 1.1, obj["z"]]), r, 2.2 * r)
    if shape == "cone":
        return intersect_cone(o, d, np.array([obj["x"], r * 1.25, obj["z"]]), r * 1.1, 2.5 * r)
    raise ValueError(f"unknown shape {shape!r}")


def render(objects: list[dict], size: int, light=(-0.5, 1.0, -0.6), ground_rgb=(0.62, 0.6, 0.56)):
    """Ray-cast one scene.

    Args:
        objects: dicts with ``shape``, ``x``, ``z``, ``radius`` and ``rgb`` (3 floats in [0, 1]).
        size: image side in pixels.

    Returns:
        ``rgb`` (size, size, 3) uint8, ``depth`` (size, size) float32 camera-space z (SKY_DEPTH where
        nothing is hit), ``mask`` (size, size) uint8 with 0 for background/ground and i+1 for object i.
    """
    origin, dirs, forward = camera_rays(size)
    light = np.asarray(light, float)
    light /= np.linalg.norm(light)
    n_pix = dirs.shape[0]

    t_best = np.full(n_pix, np.inf)
    normal = np.zeros((n_pix, 3))
    mask = np.zeros(n_pix, np.uint8)
    colour = np.zeros((n_pix, 3))
    # ground plane y = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = np.where(dirs[:, 1] < -1e-6, -origin[1] / dirs[:, 1], np.inf)
    ground = np.isfinite(t_ground)
    t_best[ground] = t_ground[ground]
    normal[ground] = (0.0, 1.0, 0.0)
    hit_g = origin + dirs * np.where(ground, t_ground, 0.0)[:, None]
    checker = ((np.floor(hit_g[:, 0] * 1.2) + np.floor(hit_g[:, 2] * 1.2)) % 2) * 0.05
    colour[ground] = (np.asarray(ground_rgb) - checker[:, None])[ground]

    for i, obj in enumerate(objects):
        t, n = intersect_object(origin, dirs, obj)
        closer = t < t_best
        t_best = np.where(closer, t, t_best)
        normal[closer] = n[closer]
        colour[closer] = obj["rgb"]
        mask[closer] = i + 1

    hit = np.isfinite(t_best)
    points = origin + dirs * np.where(hit, t_best, 0.0)[:, None]
    # shadows: a ray from each hit point towards the light
    lit = np.ones(n_pix, bool)
    shadow_origin = points + normal * 1e-3
    for obj in objects:
        ts, _ = _intersect_from_points(shadow_origin, light, obj)
        lit &= ~np.isfinite(ts)
    diffuse = np.clip(normal @ light, 0.0, 1.0) * lit
    shade = 0.35 + 0.65 * diffuse
    sky = np.array([0.72, 0.82, 0.95]) - 0.25 * np.clip(dirs[:, 1:2], 0, 1)
    rgb = np.where(hit[:, None], colour * shade[:, None], sky)
    depth = np.where(hit, (points - origin) @ forward, SKY_DEPTH)
    depth = np.minimum(depth, SKY_DEPTH)
    img = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(size, size, 3)
    return img, depth.reshape(size, size).astype(np.float32), mask.reshape(size, size)


def _intersect_from_points(points, direction, obj):
    """Intersect rays with per-ray origins (P, 3) and one direction, by shifting into the object's frame."""
    # Each primitive takes one origin; shadow rays have many. Translate so the ray origins become the
    # parameter: solve with origin 0 and the object moved by -points (vectorised over rays).
    r = obj["radius"]
    shape = obj["shape"]
    d = np.broadcast_to(direction, points.shape)
    if shape == "sphere":
        center = np.array([obj["x"], r, obj["z"]])
        oc = points - center
        b = (oc * d).sum(1)
        c = (oc * oc).sum(1) - r**2
        disc = b * b - c
        t = np.where(disc >= 0, -b + np.sqrt(np.maximum(disc, 0)), -np.inf)  # far root > 0 means in front
        t_near = np.where(disc >= 0, -b - np.sqrt(np.maximum(disc, 0)), -np.inf)
        return np.where((t > _EPS) & (t_near > _EPS), t_near, np.where(t > _EPS, t, np.inf)), None
    # boxes approximate every other shape for shadows (cheap and visually close)
    height = {"cube": 2 * r, "cylinder": 2.2 * r, "cone": 2.5 * r}[shape]
    half = np.array([r, height / 2, r])
    center = np.array([obj["x"], height / 2, obj["z"]])
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (center - half - points) / d
        t2 = (center + half - points) / d
    tmin = np.nanmax(np.minimum(t1, t2), axis=1)
    tmax = np.nanmin(np.maximum(t1, t2), axis=1)
    return np.where((tmax >= tmin) & (tmin > _EPS), tmin, np.inf), None

"""Procedural scenes for the one-view NeRF example: textured spheres, rendered exactly.

The paper's Table 4 uses ShapeNet Cars (Tancik et al.'s renders), which cannot be had
offline. This module makes a stand-in with the same structure: a scene is a small object group
in the unit ball, seen by cameras on a sphere around it, with a white background. Each scene
holds 1-3 spheres with a random base colour, a stripe texture along a random axis and Lambertian
shading from a fixed light, so views differ in what is visible and how it is shaded. Pixels are
ray-traced analytically (ray-sphere intersection), so every view's ground truth is exact.

A context point of the meta-learning task is a ray: ``x = (origin, direction)`` (6 numbers),
``y`` its RGB colour (3 numbers in ``[0, 1]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

CAMERA_DISTANCE = 2.5
"""Cameras sit on a sphere of this radius around the origin, looking at it."""
FIELD_OF_VIEW = math.radians(36.0)
"""Full vertical (and horizontal) field of view of every camera."""
NEAR, FAR = 1.5, 3.5
"""Depth range the NeRF integrates over: a ball of radius 1 around the origin, seen from
:data:`CAMERA_DISTANCE`."""
LIGHT = (0.48, 0.8, 0.36)
"""Direction towards the light (normalised when used)."""
ELEVATION = (math.radians(-10.0), math.radians(60.0))
"""Camera elevations are drawn uniformly in this range; azimuths in [0, 2 pi)."""


def _normalize(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def camera_rays(azimuth: Tensor, elevation: Tensor, resolution: int) -> Tensor:
    """Rays of ``resolution x resolution`` pixels of each camera, ``(cameras, pixels, 6)``:
    origin then unit direction, pixels in row-major order (top row first)."""
    az, el = azimuth.reshape(-1, 1), elevation.reshape(-1, 1)
    centre = CAMERA_DISTANCE * torch.cat(
        [el.cos() * az.cos(), el.sin(), el.cos() * az.sin()], dim=1
    )  # (cameras, 3), y up
    forward = _normalize(-centre)
    up = torch.tensor([0.0, 1.0, 0.0], dtype=centre.dtype).expand_as(forward)
    right = _normalize(torch.cross(forward, up, dim=1))
    true_up = torch.cross(right, forward, dim=1)
    half = math.tan(FIELD_OF_VIEW / 2)
    coords = (torch.arange(resolution, dtype=centre.dtype) + 0.5) / resolution * 2 - 1
    v, u = torch.meshgrid(-coords * half, coords * half, indexing="ij")
    u, v = u.reshape(1, -1, 1), v.reshape(1, -1, 1)
    direction = _normalize(forward[:, None] + u * right[:, None] + v * true_up[:, None])
    origin = centre[:, None].expand_as(direction)
    return torch.cat([origin, direction], dim=2)


@dataclass(frozen=True)
class Spheres:
    """Scenes of up to ``S`` spheres each: ``centre (scenes, S, 3)``, ``radius (scenes, S)``
    (0 for an absent sphere), ``colour (scenes, S, 3)``, stripe ``axis (scenes, S, 3)`` and
    ``frequency (scenes, S)``."""

    centre: Tensor
    radius: Tensor
    colour: Tensor
    axis: Tensor
    frequency: Tensor

    def render(self, rays: Tensor) -> Tensor:
        """Exact colours ``(scenes, rays, 3)`` of ``rays`` ``(scenes, rays, 6)``."""
        o, d = rays[..., None, :3], rays[..., None, 3:]  # (scenes, rays, 1, 3)
        c = self.centre[:, None]  # (scenes, 1, S, 3)
        r = self.radius[:, None]  # (scenes, 1, S)
        oc = o - c
        b = (oc * d).sum(-1)
        disc = b * b - (oc * oc).sum(-1) + r * r
        t = -b - disc.clamp(min=0).sqrt()
        hit = (disc > 0) & (t > 0) & (r > 0)
        t = torch.where(hit, t, torch.full_like(t, math.inf))
        t_near, which = t.min(dim=-1)  # (scenes, rays)
        seen = torch.isfinite(t_near)

        def pick(v: Tensor) -> Tensor:  # the nearest sphere's value for every ray
            v = v[:, None].expand(*which.shape, *v.shape[1:])
            idx = which.reshape(*which.shape, 1, *([1] * (v.dim() - 3)))
            return v.gather(2, idx.expand(*which.shape, 1, *v.shape[3:])).squeeze(2)

        point = rays[..., :3] + torch.where(seen, t_near, 0.0)[..., None] * rays[..., 3:]
        centre = pick(self.centre)
        normal = _normalize(point - centre)
        light = _normalize(torch.tensor(LIGHT, dtype=rays.dtype))
        shade = 0.5 + 0.5 * (normal * light).sum(-1).clamp(min=0)
        stripes = 0.7 + 0.3 * torch.sin(
            pick(self.frequency) * ((point - centre) * pick(self.axis)).sum(-1)
        )
        colour = pick(self.colour) * (shade * stripes)[..., None]
        return torch.where(seen[..., None], colour, torch.ones_like(colour)).clamp(0, 1)


def random_spheres(scenes: int, generator: torch.Generator, max_spheres: int = 3) -> Spheres:
    """``scenes`` random scenes inside the unit ball: a main sphere near the origin (radius
    0.35-0.5, like a centred ShapeNet object) and up to ``max_spheres - 1`` smaller ones
    (radius 0.12-0.3) around it, each with its own colour and stripes."""
    g = generator

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> Tensor:
        return low + (high - low) * torch.rand(*shape, generator=g)

    count = torch.randint(1, max_spheres + 1, (scenes, 1), generator=g)
    present = torch.arange(max_spheres)[None] < count
    main = torch.arange(max_spheres)[None] == 0
    centre = torch.where(
        main[..., None],
        uniform(scenes, max_spheres, 3, low=-0.15, high=0.15),
        uniform(scenes, max_spheres, 3, low=-0.5, high=0.5),
    )
    radius = torch.where(
        main,
        uniform(scenes, max_spheres, low=0.35, high=0.5),
        uniform(scenes, max_spheres, low=0.12, high=0.3),
    )
    return Spheres(
        centre=centre,
        radius=radius * present,
        colour=uniform(scenes, max_spheres, 3, low=0.15, high=1.0),
        axis=_normalize(torch.randn(scenes, max_spheres, 3, generator=g)),
        frequency=uniform(scenes, max_spheres, low=4.0, high=12.0),
    )


@dataclass(frozen=True)
class SceneSet:
    """Every view of every scene: ``rays (scenes, views, pixels, 6)``, ``colours (scenes,
    views, pixels, 3)``, ``resolution`` pixels a side. View 0 of a test scene is its context
    view; the others are the unseen views it is evaluated on."""

    rays: Tensor
    colours: Tensor
    resolution: int

    @property
    def scenes(self) -> int:
        return self.rays.shape[0]

    @property
    def views(self) -> int:
        return self.rays.shape[1]


def make_scenes(scenes: int, views: int, resolution: int, seed: int) -> SceneSet:
    """``scenes`` random scenes, each seen from ``views`` random cameras (deterministic in
    ``seed``)."""
    for name, value, low in (
        ("scenes", scenes, 1),
        ("views", views, 2),
        ("resolution", resolution, 4),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
    g = torch.Generator().manual_seed(seed)
    spheres = random_spheres(scenes, g)
    azimuth = 2 * math.pi * torch.rand(scenes * views, generator=g)
    low, high = ELEVATION
    elevation = low + (high - low) * torch.rand(scenes * views, generator=g)
    rays = camera_rays(azimuth, elevation, resolution).reshape(scenes, views, -1, 6)
    colours = spheres.render(rays.flatten(1, 2)).reshape(scenes, views, -1, 3)
    return SceneSet(rays=rays, colours=colours, resolution=resolution)

"""Procedural multi-view scenes with exact ground truth, for tests, demos and benchmarks.

A scene is a textured box-shaped room holding a few spheres and boxes, seen by ``num_views``
cameras on a jittered ring looking at the room's centre. Every pixel is ray-cast analytically
(no rasteriser, no mesh), so depth, world points and cameras are exact:

- ``images``       (S, 3, H, W) float32 in [0, 1]
- ``depth``        (S, H, W)    distance along the camera's z axis
- ``world_points`` (S, H, W, 3)
- ``extrinsics``   (S, 3, 4)    world-to-camera [R | t], OpenCV axes (x right, y down, z forward)
- ``intrinsics``   (S, 3, 3)    pixel units, principal point at the image centre

With ``first_view_frame=True`` (the VGGT convention) the world frame is the first camera's, so
``extrinsics[0]`` is [I | 0].

With ``distinct_walls=True`` each of the room's six faces (four walls, floor, ceiling) has a colour
of its own (random per scene) instead of one colour for the whole room, so the relative pose of
two views can be read from which walls each sees and where; with one room colour it is a
correspondence problem over a periodic texture and the few objects in the middle. The geometry,
the cameras and the objects of scene ``seed`` are the same either way.

With ``compass_walls=True`` the faces' colours are not random but fixed: each of the four walls,
the floor and the ceiling has a hue of its own, the same in every scene (only saturation and value
are drawn per scene), as if the room were painted by compass direction. One view then shows which
way it looks, as one view shows its height and pitch (from the floor and the horizon), so relative
yaw can be read by comparing what two views see of fixed landmarks rather than by matching random
colours between them. The geometry, cameras and objects are again those of the same seed. It
takes precedence over ``distinct_walls``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset


@dataclass(frozen=True)
class SyntheticSceneConfig:
    num_views: int = 8
    height: int = 224
    width: int = 224
    num_objects: int = 6
    fov_deg: float = 60.0
    room_half_size: float = 4.0
    room_height: float = 3.0
    ring_radius: float = 2.5
    first_view_frame: bool = True
    distinct_walls: bool = False
    compass_walls: bool = False

    def __post_init__(self) -> None:
        if self.num_views < 1 or self.height < 1 or self.width < 1:
            raise ValueError(f"SyntheticSceneConfig: num_views, height and width must be >= 1: {self}")
        if not 0.0 < self.ring_radius < self.room_half_size:
            raise ValueError("SyntheticSceneConfig: the camera ring must lie inside the room")


def look_at(eye: Tensor, target: Tensor, up: Tensor) -> Tensor:
    """World-to-camera [R | t] (3, 4) of a camera at ``eye`` looking at ``target``.

    OpenCV axes: z forward, x right, y down; ``up`` is the world's up direction.
    """
    z = target - eye
    z = z / z.norm()
    x = torch.linalg.cross(z, -up)
    x = x / x.norm()
    y = torch.linalg.cross(z, x)
    R = torch.stack([x, y, z])  # rows: camera axes in world coordinates
    return torch.cat([R, (-R @ eye)[:, None]], dim=1)


def _sphere_hit(origin: Tensor, dirs: Tensor, centre: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    """Nearest positive ray parameter and outward normal for a sphere (inf where missed)."""
    oc = origin - centre
    b = (dirs * oc).sum(-1)
    c = (oc * oc).sum() - radius * radius
    disc = b * b - c
    t = -b - torch.sqrt(disc.clamp_min(0))
    t = torch.where((disc > 0) & (t > 1e-4), t, torch.full_like(t, math.inf))
    normal = origin + t[..., None] * dirs - centre
    return t, normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _box_hit(origin: Tensor, dirs: Tensor, lo: Tensor, hi: Tensor, inside: bool) -> tuple[Tensor, Tensor]:
    """Ray parameter and normal for an axis-aligned box: the entry point from outside, or the
    exit point when the ray starts ``inside`` (the room's walls)."""
    inv = 1.0 / torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)
    t0 = (lo - origin) * inv
    t1 = (hi - origin) * inv
    t_min, t_max = torch.minimum(t0, t1), torch.maximum(t0, t1)
    t_near, near_axis = t_min.max(dim=-1)
    t_far, far_axis = t_max.min(dim=-1)
    if inside:
        t, axis, sign = t_far, far_axis, 1.0
    else:
        t, axis, sign = t_near, near_axis, -1.0
        t = torch.where((t_near <= t_far) & (t_near > 1e-4), t_near, torch.full_like(t_near, math.inf))
    normal = torch.nn.functional.one_hot(axis, 3).to(dirs.dtype)
    normal = normal * (-sign * torch.sign(dirs.gather(-1, axis[..., None])))
    return t, normal


def _texture(points: Tensor, object_id: Tensor, palette: Tensor, frequency: Tensor) -> Tensor:
    """Albedo (..., 3): a per-object colour modulated by a 3D checkerboard and stripes, so every
    surface has texture for matching."""
    f = frequency[object_id][..., None]
    checker = torch.floor(points * f).sum(-1).remainder(2.0)
    stripes = 0.5 + 0.5 * torch.sin(points[..., 0] * f[..., 0] * 2.3 + points[..., 2] * f[..., 0] * 1.7)
    base = palette[object_id]
    return base * (0.55 + 0.3 * checker[..., None] + 0.15 * stripes[..., None])


def render_scene(seed: int, config: SyntheticSceneConfig = SyntheticSceneConfig()) -> dict[str, Tensor]:
    """Render scene number ``seed``: the same seed always gives the same scene."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(*shape: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    S, H, W = config.num_views, config.height, config.width
    half, height = config.room_half_size, config.room_height
    up = torch.tensor([0.0, 1.0, 0.0])
    centre = torch.tensor([0.0, height / 2, 0.0])

    # Cameras on a jittered ring, all looking near the room's centre.
    start = uniform(1, lo=0, hi=2 * math.pi).item()
    extrinsics = []
    for i in range(S):
        angle = start + 2 * math.pi * i / max(S, 1) * 0.35 + uniform(1, lo=-0.05, hi=0.05).item()
        radius = config.ring_radius * uniform(1, lo=0.85, hi=1.0).item()
        eye = torch.tensor([radius * math.cos(angle), height * uniform(1, lo=0.35, hi=0.65).item(), radius * math.sin(angle)])
        target = centre + uniform(3, lo=-0.4, hi=0.4) * torch.tensor([1.0, 0.3, 1.0])
        extrinsics.append(look_at(eye, target, up))
    extrinsics = torch.stack(extrinsics)

    focal = 0.5 * W / math.tan(math.radians(config.fov_deg) / 2)
    intrinsics = torch.tensor([[focal, 0.0, W / 2], [0.0, focal, H / 2], [0.0, 0.0, 1.0]]).expand(S, 3, 3).clone()

    # Objects: spheres and boxes inside the inner ring, so cameras never start inside one.
    n_obj = config.num_objects
    palette = torch.cat([uniform(1, 3, lo=0.5, hi=0.9), uniform(n_obj, 3, lo=0.15, hi=1.0)])
    frequency = torch.cat([torch.tensor([1.5]), uniform(n_obj, lo=2.0, hi=6.0)])
    kinds = (uniform(n_obj) < 0.5).tolist()
    obj_centres = torch.stack(
        [uniform(n_obj, lo=-1.2, hi=1.2), uniform(n_obj, lo=0.3, hi=height - 0.6), uniform(n_obj, lo=-1.2, hi=1.2)], dim=-1
    )
    obj_sizes = uniform(n_obj, 3, lo=0.2, hi=0.55)
    # Drawn last, so the rest of the scene does not depend on the options.
    faces = 6 if config.distinct_walls or config.compass_walls else 1
    if config.compass_walls:
        saturation, value = uniform(faces, lo=0.45, hi=0.9), uniform(faces, lo=0.55, hi=0.95)
        palette = torch.cat([_hsv_to_rgb(COMPASS_HUES, saturation, value), palette[1:]])
    elif config.distinct_walls:
        palette = torch.cat([palette[:1], uniform(faces - 1, 3, lo=0.15, hi=1.0), palette[1:]])
    if faces > 1:
        frequency = torch.cat([frequency[:1].expand(faces - 1), frequency])

    # Rays through pixel centres, in world coordinates.
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1)
    cam_dirs = pix @ torch.linalg.inv(intrinsics[0]).T  # z component is 1: depth = t along this ray
    R, t = extrinsics[:, :, :3], extrinsics[:, :, 3]
    origins = -(R.transpose(1, 2) @ t[..., None]).squeeze(-1)  # camera centres (S, 3)
    world_dirs = torch.einsum("sji,hwj->shwi", R, cam_dirs)  # R^T d, unnormalised (z_cam = 1)

    best_t = torch.full((S, H, W), math.inf)
    best_n = torch.zeros(S, H, W, 3)
    best_id = torch.zeros(S, H, W, dtype=torch.long)
    for s in range(S):
        o, d = origins[s], world_dirs[s]
        room_lo = torch.tensor([-half, 0.0, -half])
        room_hi = torch.tensor([half, height, half])
        t_room, n_room = _box_hit(o, d, room_lo, room_hi, inside=True)
        # the room's faces are ids 0 .. faces-1 (face 2 * axis + (inward normal > 0)), objects follow
        room_id = _face_index(n_room) if faces > 1 else torch.zeros_like(best_id[s])
        cand = [(t_room, n_room, room_id)]
        for j in range(n_obj):
            c, size = obj_centres[j], obj_sizes[j]
            if kinds[j]:
                t_hit, n_hit = _sphere_hit_unnormalised(o, d, c, size[0].item())
            else:
                t_hit, n_hit = _box_hit(o, d, c - size, c + size, inside=False)
            cand.append((t_hit, n_hit, torch.full_like(best_id[s], faces + j)))
        for t_hit, n_hit, obj in cand:
            closer = t_hit < best_t[s]
            best_t[s] = torch.where(closer, t_hit, best_t[s])
            best_n[s] = torch.where(closer[..., None], n_hit, best_n[s])
            best_id[s] = torch.where(closer, obj, best_id[s])

    world_points = origins[:, None, None, :] + best_t[..., None] * world_dirs
    depth = best_t  # the ray direction has unit z in camera coordinates
    albedo = _texture(world_points, best_id, palette, frequency)
    light = torch.tensor([0.4, -0.8, 0.3])
    light = light / light.norm()
    shade = 0.35 + 0.65 * (best_n * -light).sum(-1).clamp_min(0)
    images = (albedo * shade[..., None]).clamp(0, 1).permute(0, 3, 1, 2).contiguous()

    if config.first_view_frame:
        world_points, extrinsics = _to_first_view_frame(world_points, extrinsics)
    return {
        "images": images,
        "depth": depth,
        "world_points": world_points,
        "extrinsics": extrinsics,
        "intrinsics": intrinsics,
    }


# hue of each room face (face 2 * axis + (inward normal > 0)): the x walls (faces 0, 1) and the z
# walls (4, 5) a quarter of the colour wheel apart, the ceiling (2) and the floor (3) between them
COMPASS_HUES = torch.tensor([0.0, 0.5, 0.125, 0.625, 0.25, 0.75])


def _hsv_to_rgb(hue: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    """(N, 3) RGB of N colours given as hue in [0, 1), saturation and value."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + hue[:, None] * 6) % 6
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return value[:, None] * (1 - saturation[:, None] * ramp)


def _face_index(normal: Tensor) -> Tensor:
    """Index 0..5 of the axis-aligned face with unit ``normal`` (..., 3): 2 * axis + (normal > 0)."""
    axis = normal.abs().argmax(dim=-1)
    positive = normal.gather(-1, axis[..., None]).squeeze(-1) > 0
    return 2 * axis + positive.long()


def _sphere_hit_unnormalised(origin: Tensor, dirs: Tensor, centre: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    """Sphere hit for rays whose directions are not unit length (t stays in the same units as
    the direction vectors, so depth = t for rays with unit camera z)."""
    scale = dirs.norm(dim=-1)
    t, normal = _sphere_hit(origin, dirs / scale[..., None], centre, radius)
    return t / scale, normal


def _to_first_view_frame(world_points: Tensor, extrinsics: Tensor) -> tuple[Tensor, Tensor]:
    """Re-express points and cameras in the first camera's frame: x' = R0 x + t0."""
    R0, t0 = extrinsics[0, :, :3], extrinsics[0, :, 3]
    points = world_points @ R0.T + t0
    R, t = extrinsics[:, :, :3], extrinsics[:, :, 3]
    # x_cam = R x + t = R R0^T (x' - t0) + t
    R_new = R @ R0.T
    t_new = t - (R_new @ t0[:, None]).squeeze(-1)
    return points, torch.cat([R_new, t_new[..., None]], dim=-1)


class SyntheticScenes(Dataset):
    """``length`` procedural scenes; item ``i`` is ``render_scene(seed + i, config)``."""

    def __init__(self, length: int, config: SyntheticSceneConfig = SyntheticSceneConfig(), seed: int = 0) -> None:
        if length < 1:
            raise ValueError(f"SyntheticScenes: length must be >= 1, got {length}")
        self.length, self.config, self.seed = length, config, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"SyntheticScenes: index {index} out of range for {self.length} scenes")
        return render_scene(self.seed + index, self.config)


class RenderedScenes(Dataset):
    """``count`` scenes ``render_scene(seed + i, config)`` rendered once, up front, by a pool of
    ``processes`` (one CPU thread each; 0 renders in this process), then served from memory. For
    benchmarks that time training rather than the CPU ray caster (8 views at 518 x 518 take about
    5 s a scene on one core, longer than a training step)."""

    def __init__(self, count: int, config: SyntheticSceneConfig = SyntheticSceneConfig(), seed: int = 0,
                 processes: int = 0) -> None:
        if count < 1:
            raise ValueError(f"RenderedScenes: count must be >= 1, got {count}")
        jobs = [(seed + i, config) for i in range(count)]
        if processes <= 0:
            self.scenes = [render_scene(*job) for job in jobs]
        else:
            import multiprocessing as mp

            # spawned, not forked: the caller may already hold a CUDA context
            with mp.get_context("spawn").Pool(processes, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                self.scenes = pool.starmap(render_scene, jobs)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.scenes[index]

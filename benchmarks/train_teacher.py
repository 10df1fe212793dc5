"""Train a small VGGT teacher from scratch on the synthetic multi-view scenes.

Random-weight teachers attend diffusely; the quality study (``benchmarks/quality.py``) needs one
that has learned geometry. This script trains a VGGT from the zoo (conv patch embedding,
alternating frame/global blocks with qk-norm and 2D RoPE, camera head, DPT depth and point heads;
no track head) with supervised losses on ground truth:

    loss = camera_weight * sum_i gamma^(n-1-i) |pose_enc_i - pose_enc*|_1        (each refinement i)
         + sum over depth and points of  mean(c * |x - x*|_1) - alpha * mean(log c)   (VGGT's
           confidence-aware regression; c >= 1 is the head's confidence)

Data: scenes of ``rendered_views`` views are ray-cast on the CPU by worker processes while the
GPU trains (a pool that grows during training, stored as uint8 images and fp16 depth on the
device). Each training sample draws ``views`` of a scene's views in random order, re-expresses the
cameras in the first drawn view's frame, normalises the scale by the mean depth and jitters
brightness and contrast. Held-out scenes come from a disjoint seed range. With ``--room-frame``
(and ``--compass-walls``) cameras stay in the room's frame instead (:class:`SceneSampling`).

Reported on the held-out scenes: depth AbsRel / delta<1.25 (median-aligned), point Chamfer and
pose AUC@30 of the teacher and of trivial baselines (a constant depth map, which after median
alignment is the median depth; the training set's mean pose of each view slot; identity poses).

GPU (one H100, ~8 minutes training + ~1 minute start and evaluation)::

    python benchmarks/train_teacher.py --minutes 8 --out $OUT

writes ``benchmarks/assets/teacher_vggt_small.safetensors`` (bf16 weights) and
``teacher_vggt_small.json`` (architecture, training settings, metrics, the command), and copies
both to ``--out``. ``--tiny`` trains a toy model on 28x28 images on the CPU (for tests).

The committed teacher was trained without a GPU, on 2 CPU cores in 32 minutes (2,410 steps; its
JSON has the metrics against the trivial baselines)::

    python benchmarks/train_teacher.py --minutes 32 --batch-size 2 --lr 4e-4 --image-size 112 \
        --width 192 --depth 4 --heads 3 --views 8 --pool-size 1200 --min-pool 1200 --workers 2 \
        --eval-scenes 32 --device cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lite3r_compile.distill import metrics
from lite3r_compile.distill.evaluate import evaluate, reconstruction_metrics
from lite3r_compile.distill.synthetic import SyntheticSceneConfig, render_scene
from lite3r_compile.models_zoo.da3_camera import mat_to_quat

ASSETS = Path(__file__).resolve().parent / "assets"
TEACHER_NAME = "teacher_vggt_small"
# Seeds of held-out scenes start here; training scenes use seeds below it.
HELDOUT_SEED = 1_000_000


@dataclass(frozen=True)
class TeacherArch:
    """The teacher's shape. ``width`` / ``depth`` / ``heads``: the aggregator (``depth`` frame and
    ``depth`` global blocks); heads run at ``2 * width`` (concat of frame and global tokens)."""

    image_size: int = 224
    width: int = 192
    depth: int = 4
    heads: int = 3
    dpt_features: int = 32
    dpt_channels: tuple[int, int, int, int] = (32, 64, 128, 128)
    camera_trunk_depth: int = 1
    camera_mlp_ratio: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dpt_channels", tuple(self.dpt_channels))


TINY_ARCH = TeacherArch(image_size=28, width=64, depth=2, heads=1, dpt_features=8,
                        dpt_channels=(8, 16, 16, 16), camera_mlp_ratio=1.0)


@dataclass(frozen=True)
class SceneSampling:
    """How a training or evaluation sample is drawn: ``views`` of ``rendered_views`` views of a
    scene (``distinct_walls``, ``compass_walls``: see :class:`SyntheticSceneConfig`).

    ``room_frame``: cameras and points are expressed in the room's frame (whose y axis is the
    cameras' y axis when they look level: a level camera's rotation is a pure yaw) instead of the
    first drawn view's.
    With compass walls every pose component is then readable from one view; in the first view's
    frame, yaw relative to view 0 needs what view 0 sees, and no teacher trained in minutes has
    learned to fetch it (benchmarks/NOTES.md, session 8). Pose AUC compares the poses of view
    pairs, so it means the same in either frame."""

    image_size: int = 224
    views: int = 8
    rendered_views: int = 12
    distinct_walls: bool = False
    compass_walls: bool = False
    room_frame: bool = False

    def __post_init__(self) -> None:
        if self.room_frame and not self.compass_walls:
            raise ValueError(
                "SceneSampling: room_frame (--room-frame) needs compass_walls (--compass-walls): with walls of "
                "random colours no image shows which way the room's axes point"
            )

    def scene_config(self, num_views: int | None = None) -> SyntheticSceneConfig:
        """The scene renderer's config: ``num_views`` views (default ``rendered_views``)."""
        return SyntheticSceneConfig(num_views=num_views or self.rendered_views, height=self.image_size,
                                    width=self.image_size, distinct_walls=self.distinct_walls,
                                    compass_walls=self.compass_walls, first_view_frame=not self.room_frame)


def build_teacher(arch: TeacherArch) -> nn.Module:
    """A random-initialised VGGT of shape ``arch`` from the zoo (track head off)."""
    from lite3r_compile import models_zoo
    from lite3r_compile.models_zoo.vggt import AggregatorConfig, CameraHeadConfig, DPTConfig

    d = arch.depth
    # four aggregator layers spread over the depth feed the DPT heads, as 4/11/17/23 do in VGGT-1B
    layers = tuple(round(i * (d - 1) / 3) for i in range(4))
    dpt = DPTConfig(features=arch.dpt_features, out_channels=arch.dpt_channels, intermediate_layer_idx=layers)
    model = models_zoo.create(
        "vggt-tiny",
        aggregator=AggregatorConfig(
            img_size=arch.image_size, embed_dim=arch.width, depth=d, num_heads=arch.heads, patch_embed=None,
            gradient_checkpointing=False,
        ),
        camera_head=CameraHeadConfig(trunk_depth=arch.camera_trunk_depth, num_heads=arch.heads,
                                     mlp_ratio=arch.camera_mlp_ratio),
        depth_head=dpt,
        point_head=dpt,
        enable_track=False,
    )
    return model


def load_teacher(path: str | os.PathLike = ASSETS / f"{TEACHER_NAME}.safetensors",
                 device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The trained teacher (float32, eval mode) and its JSON record, from ``path`` (the
    ``.safetensors`` file; the ``.json`` beside it gives the architecture)."""
    from lite3r_compile.models_zoo.checkpoint import read_state_dict

    path = Path(path)
    record = json.loads(path.with_suffix(".json").read_text())
    model = build_teacher(TeacherArch(**record["arch"]))
    state = {k: v.float() for k, v in read_state_dict(path).items()}
    model.load_state_dict(state)
    return model.to(device).eval(), record


# --- data ----------------------------------------------------------------------------------------

def render_compact(seed: int, sampling: SceneSampling) -> dict[str, Tensor]:
    """Scene ``seed`` with ``rendered_views`` views: uint8 images, fp16 depth, float32 cameras."""
    scene = render_scene(seed, sampling.scene_config())
    return {
        "images": (scene["images"] * 255).round().to(torch.uint8),
        "depth": scene["depth"].to(torch.float16),
        "extrinsics": scene["extrinsics"].float(),
        "intrinsics": scene["intrinsics"].float(),
    }


def _render_job(job: tuple[int, SceneSampling]) -> dict[str, Tensor]:
    return render_compact(*job)


def _single_thread() -> None:
    torch.set_num_threads(1)


def render_workers(count: int):
    """A process pool for :func:`render_compact` (forked: create it before CUDA is touched)."""
    return mp.get_context("fork").Pool(count, initializer=_single_thread)


def render_many(seeds: list[int], sampling: SceneSampling, workers: int = 0) -> list[dict[str, Tensor]]:
    """Render ``seeds`` in order, on ``workers`` processes (0: in this process)."""
    jobs = [(s, sampling) for s in seeds]
    if workers <= 0:
        return [_render_job(j) for j in jobs]
    with render_workers(workers) as pool:
        return pool.map(_render_job, jobs)


def pose_encoding(extrinsics: Tensor, intrinsics: Tensor, size: int) -> Tensor:
    """VGGT's 9-D pose encoding [t, quaternion (x, y, z, w), fov_h, fov_w] of (..., 3, 4)
    world-to-camera extrinsics and (..., 3, 3) intrinsics of ``size`` x ``size`` images."""
    fov_h = 2 * torch.atan(size / (2 * intrinsics[..., 1, 1]))
    fov_w = 2 * torch.atan(size / (2 * intrinsics[..., 0, 0]))
    quat = mat_to_quat(extrinsics[..., :3, :3].float())  # (x, y, z, w), w >= 0
    return torch.cat([extrinsics[..., :3, 3], quat, fov_h[..., None], fov_w[..., None]], -1)


def make_sample(scenes: list[dict[str, Tensor]], views: int, generator: torch.Generator,
                augment: bool, *, room_frame: bool = False) -> dict[str, Tensor]:
    """A batch (B = len(scenes)) of ``views`` randomly drawn views per scene, in random order.

    Cameras are re-expressed in the first drawn view's frame (its extrinsics are [I | 0]), or with
    ``room_frame`` kept in the room's (:class:`SceneSampling`), lengths divided by the scene's
    mean depth. Returns images (B, S, 3, H, W) in [0, 1], depth (B, S, H, W),
    world_points (B, S, H, W, 3), extrinsics (B, S, 3, 4), intrinsics (B, S, 3, 3), pose_enc (B, S, 9).
    """
    device = scenes[0]["images"].device
    picks = [torch.randperm(s["images"].shape[0], generator=generator)[:views].to(device) for s in scenes]
    images = torch.stack([s["images"][p] for s, p in zip(scenes, picks)]).float() / 255
    depth = torch.stack([s["depth"][p] for s, p in zip(scenes, picks)]).float()
    ext = torch.stack([s["extrinsics"][p] for s, p in zip(scenes, picks)])
    K = torch.stack([s["intrinsics"][p] for s, p in zip(scenes, picks)])
    R, t = ext[..., :3], ext[..., 3]
    if room_frame:
        R_rel, t_rel = R, t
    else:
        R_rel = R @ R[:, :1].transpose(-1, -2)
        t_rel = t - (R_rel @ t[:, :1, :, None]).squeeze(-1)
    scale = depth.mean(dim=(1, 2, 3))
    depth = depth / scale[:, None, None, None]
    ext = torch.cat([R_rel, (t_rel / scale[:, None, None])[..., None]], -1)
    points = metrics.depth_to_world_points(depth, ext, K)
    if augment:
        B, S = images.shape[:2]
        gain = 0.8 + 0.4 * torch.rand(B, S, 1, 1, 1, generator=generator).to(device)
        offset = 0.1 * torch.rand(B, S, 1, 1, 1, generator=generator).to(device) - 0.05
        images = (images * gain + offset).clamp(0, 1)
    return {"images": images, "depth": depth, "world_points": points, "extrinsics": ext, "intrinsics": K,
            "pose_enc": pose_encoding(ext, K, images.shape[-1])}


def heldout_batches(count: int, sampling: SceneSampling, *, workers: int = 0, device: str | torch.device = "cpu",
                    scenes: list[dict[str, Tensor]] | None = None) -> list[dict[str, Tensor]]:
    """``count`` held-out samples (one scene each, B = 1), the same on every call: seeds from
    :data:`HELDOUT_SEED`, views drawn by a fixed generator."""
    if scenes is None:
        scenes = render_many([HELDOUT_SEED + i for i in range(count)], sampling, workers)
    generator = torch.Generator().manual_seed(HELDOUT_SEED)
    return [make_sample([{k: v.to(device) for k, v in s.items()}], sampling.views, generator, augment=False,
                        room_frame=sampling.room_frame)
            for s in scenes[:count]]


# --- loss ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossWeights:
    camera: float = 2.0
    gamma: float = 0.6
    depth: float = 1.0
    points: float = 1.0
    conf_alpha: float = 0.2
    # q and -q are one rotation: score a quaternion by the nearer of the two (needed where the
    # targets span every yaw, as in the room's frame, and w >= 0 makes them jump at 180 degrees)
    quaternion_sign_invariant: bool = False


def pose_l1(pred: Tensor, target: Tensor, sign_invariant: bool) -> Tensor:
    """Mean L1 between (..., 9) pose encodings; with ``sign_invariant`` the quaternion part
    (entries 3..6) is compared with the target's or its negation's, whichever is nearer."""
    err = (pred - target).abs()
    if sign_invariant:
        flipped = (pred[..., 3:7] + target[..., 3:7]).abs()
        nearer = err[..., 3:7].sum(-1, keepdim=True) <= flipped.sum(-1, keepdim=True)
        err = torch.cat([err[..., :3], torch.where(nearer, err[..., 3:7], flipped), err[..., 7:]], -1)
    return err.mean()


def _confident_l1(pred: Tensor, target: Tensor, conf: Tensor, alpha: float) -> Tensor:
    err = (pred - target).abs()
    err = err.sum(-1) if err.dim() == conf.dim() + 1 else err
    return (conf * err).mean() - alpha * conf.log().mean()


def teacher_loss(out: dict, batch: dict[str, Tensor], w: LossWeights) -> tuple[Tensor, dict[str, float]]:
    """The supervised loss of VGGT's outputs against a batch from :func:`make_sample`."""
    poses = out["pose_enc_list"]
    n = len(poses)
    camera = sum(w.gamma ** (n - 1 - i) * pose_l1(p, batch["pose_enc"], w.quaternion_sign_invariant)
                 for i, p in enumerate(poses))
    depth = _confident_l1(out["depth"][..., 0], batch["depth"], out["depth_conf"], w.conf_alpha)
    points = _confident_l1(out["world_points"], batch["world_points"], out["world_points_conf"], w.conf_alpha)
    loss = w.camera * camera + w.depth * depth + w.points * points
    return loss, {"camera": camera.item(), "depth": depth.item(), "points": points.item()}


# --- evaluation ----------------------------------------------------------------------------------

def _mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = rows[0].keys()
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def gt_reference(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"depth": batch["depth"], "world_points": batch["world_points"], "extrinsics": batch["extrinsics"]}


def evaluate_model(model: nn.Module, batches: list[dict[str, Tensor]], *, autocast: bool) -> dict[str, float]:
    """Mean metrics of ``model`` against ground truth over ``batches`` (median-aligned depth)."""
    device = batches[0]["images"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        return evaluate(model, None, batches, device=device)["student_vs_gt"]


POSE_COMPONENTS = ("t_x", "t_y", "t_z", "q_x", "q_y", "q_z", "q_w")


def pose_component_correlation(model: nn.Module, batches: list[dict[str, Tensor]], *, autocast: bool,
                               first: int = 1) -> dict[str, float]:
    """Pearson correlation of each predicted pose component (translation, quaternion) with its
    target over views ``first``..S-1 of ``batches`` (1 in the first view's frame, where view 0's
    pose is the identity; 0 in the room's). A predicted quaternion is taken with the sign nearer
    its target (q and -q are one rotation). What one view shows (height, pitch) is learned long
    before what needs two (yaw, the position along the ring): the aggregate pose metrics hide
    which."""
    device = batches[0]["images"].device
    predicted, target = [], []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for batch in batches:
            predicted.append(model(batch["images"])["pose_enc"][:, first:, :7].float().reshape(-1, 7))
            target.append(batch["pose_enc"][:, first:, :7].reshape(-1, 7))
    predicted, target = torch.cat(predicted), torch.cat(target)
    sign = torch.where((predicted[:, 3:] * target[:, 3:]).sum(-1, keepdim=True) < 0, -1.0, 1.0)
    predicted = torch.cat([predicted[:, :3], predicted[:, 3:] * sign], -1)
    return {name: torch.corrcoef(torch.stack([predicted[:, i], target[:, i]]))[0, 1].item()
            for i, name in enumerate(POSE_COMPONENTS)}


def baseline_metrics(batches: list[dict[str, Tensor]], mean_pose: Tensor) -> dict[str, dict[str, float]]:
    """Trivial predictors: a constant depth map (unprojected with the true intrinsics and identity
    poses) with the training set's mean pose per view slot, and with identity poses."""
    out: dict[str, list[dict[str, float]]] = {"constant_depth+mean_pose": [], "identity_pose": []}
    for batch in batches:
        depth = torch.ones_like(batch["depth"])
        identity = torch.eye(3, 4, device=depth.device).expand(*depth.shape[:2], 3, 4)
        points = metrics.depth_to_world_points(depth, identity, batch["intrinsics"])
        pose = mean_pose.to(depth.device).expand(*depth.shape[:2], 9)
        ref = gt_reference(batch)
        out["constant_depth+mean_pose"].append(
            reconstruction_metrics({"depth": depth, "world_points": points, "pose_enc": pose}, ref, align_scale=True)
        )
        out["identity_pose"].append(reconstruction_metrics({"extrinsics": identity}, ref, align_scale=True))
    return {k: _mean_metrics(v) for k, v in out.items()}


# --- training ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainSettings:
    minutes: float = 8.0
    max_steps: int = 0
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.03
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    pool_size: int = 3000
    min_pool: int = 64
    workers: int = 0
    eval_scenes: int = 32
    seed: int = 0
    weights: LossWeights = LossWeights()


class GrowingPool:
    """Scenes on the device, appended as the render workers finish them."""

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.device, self.capacity, self.scenes = device, capacity, []

    def add(self, scene: dict[str, Tensor]) -> None:
        if len(self.scenes) < self.capacity:
            self.scenes.append({k: v.to(self.device, non_blocking=True) for k, v in scene.items()})

    def __len__(self) -> int:
        return len(self.scenes)


def lr_factor(progress: float, warmup: float, min_ratio: float) -> float:
    """Linear warm-up over the first ``warmup`` of the run, then cosine to ``min_ratio``."""
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    p = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def train(arch: TeacherArch, sampling: SceneSampling, settings: TrainSettings, device: torch.device,
          log=print) -> tuple[nn.Module, dict]:
    """Train a teacher; returns it (float32) and a record of the run (losses, steps, timing, the
    held-out batches' metrics are computed by the caller)."""
    # Workers fork before CUDA is initialised in this process.
    workers = render_workers(settings.workers) if settings.workers > 0 else None
    target = settings.pool_size
    jobs = [(s, sampling) for s in range(target)]
    # held-out scenes first: the pool's task queue is first in, first out
    heldout_jobs = [(HELDOUT_SEED + i, sampling) for i in range(settings.eval_scenes)]
    heldout_async = workers.map_async(_render_job, heldout_jobs) if workers else None
    stream = workers.imap_unordered(_render_job, jobs, chunksize=1) if workers else iter(map(_render_job, jobs))

    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = build_teacher(arch).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr, betas=(0.9, 0.95), **fused,
    )
    pool = GrowingPool(device, target)
    t_fill = time.perf_counter()
    while len(pool) < min(settings.min_pool, target):
        pool.add(next(stream))
    log(f"pool: {len(pool)} scenes rendered in {time.perf_counter() - t_fill:.1f} s; training")

    budget = settings.minutes * 60
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    step = 0
    autocast = device.type == "cuda"
    while True:
        elapsed = time.perf_counter() - t0
        if (settings.max_steps and step >= settings.max_steps) or (not settings.max_steps and elapsed >= budget):
            break
        progress = step / settings.max_steps if settings.max_steps else elapsed / budget
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * lr_factor(progress, settings.warmup_fraction, settings.min_lr_ratio)
        # take whatever the workers have finished, without waiting
        while workers is not None and len(pool) < target:
            try:
                pool.add(stream.next(timeout=0))
            except (mp.TimeoutError, StopIteration):
                break
        idx = torch.randint(len(pool), (settings.batch_size,), generator=generator).tolist()
        batch = make_sample([pool.scenes[i] for i in idx], sampling.views, generator, augment=True,
                            room_frame=sampling.room_frame)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(batch["images"])
        loss, parts = teacher_loss(out, batch, settings.weights)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_teacher: loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
        step += 1
        if step % 50 == 0 or step == 1:
            record = {"step": step, "seconds": round(time.perf_counter() - t0, 1), "loss": loss.item(), **parts,
                      "pool": len(pool), "lr": optimizer.param_groups[0]["lr"]}
            history.append(record)
            log(json.dumps(record))
    seconds = time.perf_counter() - t0
    heldout = heldout_async.get() if heldout_async is not None else None
    # the training set's mean pose of each view slot, a baseline (from pool samples)
    mean_pose = torch.cat([
        make_sample([pool.scenes[i]], sampling.views, generator, augment=False,
                    room_frame=sampling.room_frame)["pose_enc"]
        for i in torch.randint(len(pool), (min(256, 4 * len(pool)),), generator=generator).tolist()
    ]).mean(0)
    if workers is not None:
        workers.terminate()
    run = {"steps": step, "train_seconds": round(seconds, 1), "pool_scenes": len(pool),
           "seconds_per_step": seconds / max(1, step), "history": history}
    return model.float(), {"run": run, "heldout_scenes": heldout, "mean_pose": mean_pose}


def _bf16_round_trip(model: nn.Module) -> None:
    """Round the weights to bf16 (what the file stores), so the reported metrics are the file's."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(torch.bfloat16).float())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="training time budget (default 8)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: by time)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--image-size", type=int, default=None, help="square image side, a multiple of 14 (default 224)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None, help="frame (and global) blocks")
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--camera-trunk-depth", type=int, default=None,
                        help="blocks of the camera head's trunk, which attends across the views (default 1)")
    parser.add_argument("--camera-mlp-ratio", type=float, default=None, help="MLP ratio of that trunk (default 2)")
    parser.add_argument("--views", type=int, default=None, help="views per sample (default 8; tiny 4)")
    parser.add_argument("--pool-size", type=int, default=None, help="training scenes rendered at most")
    parser.add_argument("--workers", type=int, default=None, help="render processes (default: cores - 2)")
    parser.add_argument("--min-pool", type=int, default=None,
                        help="scenes rendered before training starts (default 64); set it to --pool-size on a "
                             "CPU, where render workers would otherwise share the training's cores")
    parser.add_argument("--eval-scenes", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distinct-walls", action="store_true",
                        help="scenes whose six room faces have colours of their own (SyntheticSceneConfig.distinct_walls)")
    parser.add_argument("--compass-walls", action="store_true",
                        help="room faces painted in fixed hues, the same in every scene (SyntheticSceneConfig.compass_walls)")
    parser.add_argument("--room-frame", action="store_true",
                        help="poses and points in the room's frame instead of the first view's (needs --compass-walls)")
    parser.add_argument("--tiny", action="store_true", help="toy model on 28x28 images (CPU tests)")
    parser.add_argument("--assets", type=Path, default=ASSETS, help="where the weights and JSON go")
    parser.add_argument("--out", type=Path, default=None, help="also copy the outputs here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    arch = TINY_ARCH if args.tiny else TeacherArch()
    arch = dataclasses.replace(arch, **{k: v for k, v in
                                        (("image_size", args.image_size), ("width", args.width),
                                         ("depth", args.depth), ("heads", args.heads),
                                         ("camera_trunk_depth", args.camera_trunk_depth),
                                         ("camera_mlp_ratio", args.camera_mlp_ratio))
                                        if v is not None})
    views = args.views or (4 if args.tiny else 8)
    sampling = SceneSampling(image_size=arch.image_size, views=views, rendered_views=views + (2 if args.tiny else 4),
                             distinct_walls=args.distinct_walls, compass_walls=args.compass_walls,
                             room_frame=args.room_frame)
    workers = args.workers if args.workers is not None else (0 if args.tiny else max(1, (os.cpu_count() or 2) - 2))
    settings = TrainSettings(
        minutes=args.minutes, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
        pool_size=args.pool_size or (16 if args.tiny else 3000),
        min_pool=args.min_pool or (4 if args.tiny else 64),
        workers=workers, eval_scenes=args.eval_scenes or (2 if args.tiny else 32), seed=args.seed,
        weights=LossWeights(quaternion_sign_invariant=sampling.room_frame),
    )
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(f"train_teacher: {arch} on {device}; {sampling}; {settings.minutes} min, {workers} render workers",
          flush=True)

    t_start = time.perf_counter()
    model, trained = train(arch, sampling, settings, device, log=lambda s: print(s, flush=True))
    _bf16_round_trip(model)
    batches = heldout_batches(settings.eval_scenes, sampling, device=device, scenes=trained["heldout_scenes"])
    teacher_metrics = evaluate_model(model, batches, autocast=device.type == "cuda")
    correlation = pose_component_correlation(model, batches, autocast=device.type == "cuda",
                                             first=0 if sampling.room_frame else 1)
    baselines = baseline_metrics(batches, trained["mean_pose"])

    args.assets.mkdir(parents=True, exist_ok=True)
    weights_path = args.assets / f"{TEACHER_NAME}.safetensors"
    from lite3r_compile.models_zoo.checkpoint import save_state_dict

    save_state_dict({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()},
                    weights_path)
    record = {
        "arch": dataclasses.asdict(arch),
        "sampling": dataclasses.asdict(sampling),
        "settings": dataclasses.asdict(settings),
        "command": "python benchmarks/train_teacher.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "file_bytes": weights_path.stat().st_size,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        **trained["run"],
        "mean_pose": trained["mean_pose"].tolist(),
        "heldout": {"scenes": settings.eval_scenes, "seed": HELDOUT_SEED, "teacher": teacher_metrics,
                    "pose_component_correlation": correlation,
                    "baselines": baselines},
    }
    json_path = weights_path.with_suffix(".json")
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["heldout"], indent=1))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for p in (weights_path, json_path):
            shutil.copy(p, args.out / p.name)
    return record


if __name__ == "__main__":
    main()

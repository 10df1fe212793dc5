"""Multi-view scene folders: one folder a scene, ``num_views`` views sampled per item.

A scene folder holds its images either directly or under ``images/`` / ``blended_images/``
(BlendedMVS). Where present, MVSNet-style ground truth is read along: cameras from
``cams/XXXXXXXX_cam.txt``, depth maps from ``rendered_depth_maps/XXXXXXXX.pfm`` or
``depths/XXXXXXXX.pfm``, and view pairs from ``pair.txt`` or ``cams/pair.txt`` (then an item is a
reference view and its best source views, as MVS evaluations pick them).

Images are prepared the way VGGT expects them ("crop" mode): resized to width ``width`` (518)
with the height scaled by the aspect ratio and rounded to a multiple of the patch size (14), then
centre-cropped to at most ``width`` rows. Intrinsics and depth maps follow the same resize and crop.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lite3r_compile.distill.mvsnet import read_cam_file, read_pair_file, read_pfm

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IMAGE_DIRS = ("images", "blended_images")
DEPTH_DIRS = ("rendered_depth_maps", "depths", "depth")


class ImageReadError(ValueError):
    """An image file could not be read or decoded."""


@dataclass(frozen=True)
class Preprocess:
    """VGGT-style resize and crop: width ``width``; height by aspect, a multiple of ``patch_size``."""

    width: int = 518
    patch_size: int = 14

    def __post_init__(self) -> None:
        if self.width % self.patch_size:
            raise ValueError(f"Preprocess: width {self.width} is not a multiple of patch_size {self.patch_size}")

    def output_size(self, height: int, width: int) -> tuple[int, int, int]:
        """(resized height, final height after crop, crop offset in rows)."""
        resized = max(self.patch_size, round(height * self.width / width / self.patch_size) * self.patch_size)
        final = min(resized, self.width)
        return resized, final, (resized - final) // 2


def load_image(path: str | Path) -> Tensor:
    """An image file as float32 (3, H, W) in [0, 1]; :class:`ImageReadError` names the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ImageReadError(f"{path}: cannot read image ({exc})") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def preprocess_view(
    image: Tensor, prep: Preprocess, intrinsic: Tensor | None = None, depth: Tensor | None = None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Resize and crop one view (3, H, W); intrinsics (3, 3) and depth (H, W) follow."""
    _, h, w = image.shape
    resized, final, offset = prep.output_size(h, w)
    image = F.interpolate(image[None], size=(resized, prep.width), mode="bicubic", align_corners=False)[0]
    image = image[:, offset : offset + final].clamp(0, 1)
    if intrinsic is not None:
        intrinsic = intrinsic.clone().double()
        intrinsic[0] *= prep.width / w
        intrinsic[1] *= resized / h
        intrinsic[1, 2] -= offset
        intrinsic = intrinsic.float()
    if depth is not None:
        depth = F.interpolate(depth[None, None], size=(resized, prep.width), mode="nearest")[0, 0]
        depth = depth[offset : offset + final]
    return image, intrinsic, depth


@dataclass
class SceneFolder:
    """One scene on disk: its image files (by view id) and where its ground truth lives."""

    root: Path
    images: dict[int, Path]
    cams: Path | None
    depths: Path | None
    pairs: dict[int, list[tuple[int, float]]] | None

    @classmethod
    def scan(cls, root: Path) -> "SceneFolder":
        image_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), root)
        files = sorted(
            p for p in image_dir.iterdir()
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith("_masked")
        )
        images = {}
        for index, path in enumerate(files):
            images[int(path.stem) if path.stem.isdigit() else index] = path
        cams = root / "cams" if (root / "cams").is_dir() else None
        depths = next((root / d for d in DEPTH_DIRS if (root / d).is_dir()), None)
        pair_path = next((p for p in (root / "pair.txt", root / "cams" / "pair.txt") if p.is_file()), None)
        pairs = read_pair_file(pair_path) if pair_path else None
        return cls(root=root, images=images, cams=cams, depths=depths, pairs=pairs)


class MultiViewFolder(Dataset):
    """Scenes under ``root`` (every sub-folder holding images is one scene).

    Item ``i`` is scene ``i % len(scenes)`` with ``num_views`` views: the reference view and its
    best sources when the scene has a pair file, else a random subset, drawn from a generator
    seeded by ``(seed, i)`` so runs are reproducible. Unreadable images raise
    :class:`ImageReadError` naming the file, or with ``skip_bad_images=True`` are skipped with a
    warning (another view takes their place).
    """

    def __init__(
        self,
        root: str | Path,
        num_views: int,
        *,
        preprocess: Preprocess = Preprocess(),
        length: int | None = None,
        seed: int = 0,
        skip_bad_images: bool = False,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"MultiViewFolder: {self.root} is not a folder")
        if num_views < 1:
            raise ValueError(f"MultiViewFolder: num_views must be >= 1, got {num_views}")
        candidates = [self.root] + sorted(p for p in self.root.iterdir() if p.is_dir())
        self.scenes = [s for s in (SceneFolder.scan(p) for p in candidates) if s.images]
        if not self.scenes:
            raise ValueError(f"MultiViewFolder: no scene with images under {self.root}")
        for scene in self.scenes:
            if len(scene.images) < num_views:
                raise ValueError(
                    f"MultiViewFolder: scene {scene.root} has {len(scene.images)} images, fewer than "
                    f"the {num_views} views asked for"
                )
        self.num_views = num_views
        self.preprocess = preprocess
        self.length = length if length is not None else len(self.scenes)
        self.seed = seed
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return self.length

    def _choose_views(self, scene: SceneFolder, rng: random.Random) -> list[int]:
        ids = sorted(scene.images)
        if scene.pairs:
            ref = rng.choice([r for r in scene.pairs if r in scene.images])
            chosen = [ref] + [v for v, _ in scene.pairs[ref] if v in scene.images and v != ref]
            rest = [v for v in ids if v not in chosen]
            rng.shuffle(rest)
            return (chosen + rest)
        rng.shuffle(ids)
        return ids

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"MultiViewFolder: index {index} out of range for {self.length} items")
        scene = self.scenes[index % len(self.scenes)]
        rng = random.Random(self.seed * 1_000_003 + index)
        views, images, intrinsics, extrinsics, depths = [], [], [], [], []
        for view in self._choose_views(scene, rng):
            try:
                image = load_image(scene.images[view])
            except ImageReadError as exc:
                if not self.skip_bad_images:
                    raise
                warnings.warn(f"skipping unreadable image: {exc}", stacklevel=2)
                continue
            K = E = D = None
            if scene.cams is not None:
                cam = read_cam_file(scene.cams / f"{view:08d}_cam.txt")
                K = torch.from_numpy(cam.intrinsic).float()
                E = torch.from_numpy(cam.extrinsic[:3]).float()
            if scene.depths is not None:
                D = torch.from_numpy(read_pfm(scene.depths / f"{view:08d}.pfm").copy())
            image, K, D = preprocess_view(image, self.preprocess, K, D)
            views.append(view)
            images.append(image)
            intrinsics.append(K)
            extrinsics.append(E)
            depths.append(D)
            if len(views) == self.num_views:
                break
        if len(views) < self.num_views:
            raise ValueError(
                f"MultiViewFolder: scene {scene.root} has only {len(views)} readable images, fewer than "
                f"the {self.num_views} views asked for"
            )
        sizes = {tuple(im.shape) for im in images}
        if len(sizes) > 1:
            raise ValueError(f"MultiViewFolder: scene {scene.root} mixes image sizes after preprocessing: {sorted(sizes)}")
        item = {"images": torch.stack(images), "scene": scene.root.name, "views": torch.tensor(views)}
        if scene.cams is not None:
            item["intrinsics"] = torch.stack(intrinsics)
            item["extrinsics"] = torch.stack(extrinsics)
        if scene.depths is not None:
            item["depth"] = torch.stack(depths)
        return item

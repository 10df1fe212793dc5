"""Synthetic scenes, MVSNet readers, the scene-folder dataset and the reconstruction metrics."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lite3r_compile.distill import metrics
from lite3r_compile.distill.data import ImageReadError, MultiViewFolder, Preprocess, load_image
from lite3r_compile.distill.mvsnet import (
    MVSCamera, read_cam_file, read_pair_file, read_pfm, write_cam_file, write_pair_file, write_pfm,
)
from lite3r_compile.distill.synthetic import SyntheticScenes, SyntheticSceneConfig, render_scene

SMALL = SyntheticSceneConfig(num_views=3, height=28, width=42, num_objects=3)


# --- synthetic scenes ---------------------------------------------------------------------------

def test_scene_is_deterministic_and_well_formed():
    a, b, c = render_scene(7, SMALL), render_scene(7, SMALL), render_scene(8, SMALL)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["images"], c["images"])
    assert a["images"].shape == (3, 3, 28, 42) and a["depth"].shape == (3, 28, 42)
    assert a["world_points"].shape == (3, 28, 42, 3) and a["extrinsics"].shape == (3, 3, 4)
    assert 0 <= a["images"].min() and a["images"].max() <= 1
    assert torch.isfinite(a["depth"]).all() and (a["depth"] > 0).all()
    # the world frame is the first camera's
    assert torch.allclose(a["extrinsics"][0], torch.eye(3, 4), atol=1e-5)


def test_depth_cameras_and_points_agree():
    scene = render_scene(3, SMALL)
    points = metrics.depth_to_world_points(scene["depth"], scene["extrinsics"], scene["intrinsics"])
    assert torch.allclose(points, scene["world_points"], atol=1e-3)
    # a point seen by view 0 projects into view 1 at the depth that view 1's camera gives it
    R, t = scene["extrinsics"][1, :, :3], scene["extrinsics"][1, :, 3]
    cam1 = scene["world_points"][0] @ R.T + t
    assert (cam1[..., 2] > 0).float().mean() > 0.5


def test_distinct_walls_recolour_the_room_and_nothing_else():
    config = dataclasses.replace(SMALL, first_view_frame=False, num_views=4)
    plain = render_scene(11, config)
    walls = render_scene(11, dataclasses.replace(config, distinct_walls=True))
    for key in ("depth", "world_points", "extrinsics", "intrinsics"):
        assert torch.equal(plain[key], walls[key]), key
    # world frame: the room is the box [-4, 4] x [0, 3] x [-4, 4]; objects are inside it
    p, eps = plain["world_points"], 1e-3
    on_room = ((p[..., 0].abs() > 4 - eps) | (p[..., 2].abs() > 4 - eps) | (p[..., 1] < eps) | (p[..., 1] > 3 - eps))
    changed = (plain["images"] != walls["images"]).any(dim=1)  # (S, H, W)
    assert on_room.any() and (~on_room).any()
    assert not changed[~on_room].any()
    # every face but the one that keeps the room's colour is recoloured, and the floor is one
    floor = p[..., 1] < eps
    assert changed[floor].float().mean() > 0.9


def _hue(rgb: torch.Tensor) -> torch.Tensor:
    """Hue in [0, 1) of (..., 3) colours (independent of saturation and value)."""
    r, g, b = rgb.unbind(-1)
    top, low = rgb.max(-1).values, rgb.min(-1).values
    span = (top - low).clamp_min(1e-6)
    hue = torch.where(top == r, ((g - b) / span) % 6, torch.where(top == g, (b - r) / span + 2, (r - g) / span + 4))
    return hue / 6


def test_compass_walls_paint_each_face_the_same_hue_in_every_scene():
    config = dataclasses.replace(SMALL, first_view_frame=False, num_views=4, compass_walls=True)
    plain = render_scene(11, dataclasses.replace(config, compass_walls=False))
    for key in ("depth", "world_points", "extrinsics", "intrinsics"):
        assert torch.equal(plain[key], render_scene(11, config)[key]), key
    eps = 1e-3
    # (face, its pixels, its hue): COMPASS_HUES by face index 2 * axis + (inward normal > 0)
    faces = [("wall x=4", lambda p: p[..., 0] > 4 - eps, 0.0), ("wall x=-4", lambda p: p[..., 0] < -4 + eps, 0.5),
             ("floor", lambda p: p[..., 1] < eps, 0.625), ("wall z=4", lambda p: p[..., 2] > 4 - eps, 0.25),
             ("wall z=-4", lambda p: p[..., 2] < -4 + eps, 0.75)]
    for seed in (11, 12, 13):
        scene = render_scene(seed, config)
        p, rgb = scene["world_points"], scene["images"].permute(0, 2, 3, 1)
        checked = 0
        for name, pixels, expected in faces:
            mask = pixels(p)
            if mask.sum() < 10:
                continue
            hue = _hue(rgb[mask]).median().item()
            # hue 0 and hue 1 are the same red
            assert min(abs(hue - expected), 1 - abs(hue - expected)) < 0.02, (seed, name, hue)
            checked += 1
        assert checked >= 3, (seed, checked)


def test_synthetic_dataset_indexing():
    ds = SyntheticScenes(2, SMALL, seed=5)
    assert len(ds) == 2 and torch.equal(ds[1]["images"], render_scene(6, SMALL)["images"])
    with pytest.raises(IndexError):
        ds[2]


# --- metrics -----------------------------------------------------------------------------------

def test_depth_metrics():
    ref = torch.rand(2, 8, 8) + 1.0
    assert metrics.depth_abs_rel(ref, ref) == 0.0
    assert metrics.depth_delta(ref, ref) == 1.0
    assert metrics.depth_abs_rel(ref * 1.1, ref) == pytest.approx(0.1, rel=1e-5)
    assert metrics.depth_delta(ref * 1.3, ref) == 0.0
    # median alignment removes a global scale per view
    scaled = ref * torch.tensor([3.0, 0.5])[:, None, None]
    assert metrics.depth_abs_rel(scaled, ref, align="median") == pytest.approx(0.0, abs=1e-6)
    # invalid reference pixels are ignored
    ref_holes = ref.clone()
    ref_holes[0, 0, 0] = 0.0
    pred = ref.clone()
    pred[0, 0, 0] = 100.0
    assert metrics.depth_abs_rel(pred, ref_holes) == 0.0
    with pytest.raises(ValueError, match="no valid pixel"):
        metrics.depth_abs_rel(ref, torch.zeros_like(ref))


def test_point_cloud_errors():
    pts = torch.randn(4, 5, 3)
    assert metrics.point_cloud_errors(pts, pts)["chamfer"] == 0.0
    shifted = metrics.point_cloud_errors(pts + torch.tensor([0.0, 0.0, 10.0]), pts)
    assert shifted["accuracy"] > 5 and shifted["completeness"] > 5


def test_nearest_distance_is_the_brute_force_minimum():
    # the CPU path searches a k-d tree; it must give the exhaustive search's distances
    gen = torch.Generator().manual_seed(0)
    src, dst = torch.randn(700, 3, generator=gen), torch.randn(500, 3, generator=gen) * 2
    brute = (src[:, None, :].double() - dst[None].double()).norm(dim=-1).min(dim=1).values
    nearest = metrics._nearest_distance(src, dst)
    assert nearest.dtype == src.dtype and nearest.shape == (700,)
    torch.testing.assert_close(nearest.double(), brute, rtol=1e-6, atol=1e-6)


def _random_rotation(gen):
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.det(q))


def test_camera_metrics_are_invariant_to_a_similarity_of_the_world():
    gen = torch.Generator().manual_seed(0)
    ext = torch.stack([torch.cat([_random_rotation(gen), torch.randn(3, 1, generator=gen, dtype=torch.float64)], 1) for _ in range(4)])
    # world x' = s Q x + c: camera [R | t] becomes [R Q^T | s t - R Q^T c]
    Q, s, c = _random_rotation(gen), 2.5, torch.randn(3, generator=gen, dtype=torch.float64)
    R, t = ext[:, :, :3], ext[:, :, 3]
    R2 = R @ Q.T
    t2 = s * t - (R2 @ c[:, None]).squeeze(-1)
    moved = torch.cat([R2, t2[..., None]], dim=-1)
    out = metrics.camera_metrics(moved, ext)
    assert out["rotation_error_deg"] < 1e-3 and out["translation_error_deg"] < 1e-3
    assert out["auc@30"] == 1.0


def test_camera_metrics_measure_a_known_rotation_error():
    ext = torch.zeros(2, 3, 4, dtype=torch.float64)
    ext[:, :, :3] = torch.eye(3)
    ext[1, 0, 3] = 1.0
    bad = ext.clone()
    a = math.radians(10)
    bad[1, :, :3] = torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rot, _ = metrics.camera_pair_errors(bad, ext)
    assert torch.allclose(rot, torch.full_like(rot, 10.0), atol=1e-3)
    auc = metrics.pose_auc(torch.tensor([10.0]), torch.tensor([0.0]), 30)
    assert auc == pytest.approx(20 / 30)


def test_pose_encoding_roundtrip_through_quaternions():
    gen = torch.Generator().manual_seed(1)
    R = _random_rotation(gen).float()
    # quaternion (x, y, z, w) of R
    w = torch.sqrt(1 + R.trace()) / 2
    q = torch.stack([(R[2, 1] - R[1, 2]) / (4 * w), (R[0, 2] - R[2, 0]) / (4 * w), (R[1, 0] - R[0, 1]) / (4 * w), w])
    enc = torch.cat([torch.tensor([1.0, 2.0, 3.0]), q, torch.tensor([0.9, 0.9])])
    ext = metrics.pose_encoding_to_extrinsics(enc)
    assert torch.allclose(ext[:, :3], R, atol=1e-5) and torch.allclose(ext[:, 3], torch.tensor([1.0, 2.0, 3.0]))


# --- MVSNet formats ----------------------------------------------------------------------------

def test_mvsnet_files_roundtrip(tmp_path):
    cam = MVSCamera(np.eye(4), np.array([[100.0, 0, 32], [0, 100, 24], [0, 0, 1]]), 425.0, 2.5, 192, 905.0)
    write_cam_file(tmp_path / "00000000_cam.txt", cam)
    back = read_cam_file(tmp_path / "00000000_cam.txt")
    assert np.allclose(back.extrinsic, cam.extrinsic) and np.allclose(back.intrinsic, cam.intrinsic)
    assert (back.depth_min, back.depth_interval, back.depth_num, back.depth_max) == (425.0, 2.5, 192, 905.0)

    pairs = {0: [(1, 0.9), (2, 0.5)], 1: [(0, 0.9)], 2: []}
    write_pair_file(tmp_path / "pair.txt", pairs)
    assert read_pair_file(tmp_path / "pair.txt") == pairs

    for image in (np.random.rand(5, 7).astype(np.float32), np.random.rand(5, 7, 3).astype(np.float32)):
        write_pfm(tmp_path / "d.pfm", image)
        assert np.array_equal(read_pfm(tmp_path / "d.pfm"), image)


def test_pfm_big_endian_and_bad_files(tmp_path):
    image = np.arange(6, dtype=np.float32).reshape(2, 3)
    (tmp_path / "be.pfm").write_bytes(b"Pf\n3 2\n1.0\n" + np.flipud(image).astype(">f4").tobytes())
    assert np.array_equal(read_pfm(tmp_path / "be.pfm"), image)
    (tmp_path / "bad.pfm").write_bytes(b"P6\n3 2\n255\n")
    with pytest.raises(ValueError, match="bad.pfm: not a PFM file"):
        read_pfm(tmp_path / "bad.pfm")
    (tmp_path / "short.pfm").write_bytes(b"Pf\n3 2\n-1.0\n" + b"\0" * 8)
    with pytest.raises(ValueError, match="short.pfm"):
        read_pfm(tmp_path / "short.pfm")
    (tmp_path / "cam.txt").write_text("extrinsic\n1 2 3\n")
    with pytest.raises(ValueError, match="cam.txt: not an MVSNet camera file"):
        read_cam_file(tmp_path / "cam.txt")


# --- scene folders -----------------------------------------------------------------------------

def _write_mvs_scene(root, scene, image_dir="blended_images", depth_dir="rendered_depth_maps"):
    (root / image_dir).mkdir(parents=True)
    (root / "cams").mkdir()
    (root / depth_dir).mkdir()
    S = scene["images"].shape[0]
    for i in range(S):
        array = (scene["images"][i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(root / image_dir / f"{i:08d}.png")
        E = np.eye(4)
        E[:3] = scene["extrinsics"][i].double().numpy()
        write_cam_file(root / "cams" / f"{i:08d}_cam.txt", MVSCamera(E, scene["intrinsics"][i].double().numpy(), 0.1, 0.01))
        write_pfm(root / depth_dir / f"{i:08d}.pfm", scene["depth"][i].numpy())
    write_pair_file(root / "cams" / "pair.txt", {i: [(j, 1.0 / (1 + abs(i - j))) for j in range(S) if j != i] for i in range(S)})


def test_scene_folder_reads_mvsnet_layout(tmp_path):
    scene = render_scene(0, SyntheticSceneConfig(num_views=3, height=28, width=42, num_objects=2))
    _write_mvs_scene(tmp_path / "scene_a", scene)
    ds = MultiViewFolder(tmp_path, num_views=2, preprocess=Preprocess(width=42, patch_size=14))
    item = ds[0]
    assert item["images"].shape == (2, 3, 28, 42)
    assert item["depth"].shape == (2, 28, 42) and item["extrinsics"].shape == (2, 3, 4)
    # views are the pair file's reference and its best source
    ref, src = item["views"].tolist()
    assert abs(ref - src) == 1
    # at the native width nothing is resampled: the files give back the scene
    assert torch.allclose(item["depth"][0], scene["depth"][ref])
    assert torch.allclose(item["intrinsics"][0], scene["intrinsics"][ref], atol=1e-4)
    assert (item["images"][0] - scene["images"][ref]).abs().max() < 1 / 255 + 1e-6


def test_vggt_preprocessing_resizes_and_crops(tmp_path):
    prep = Preprocess()  # width 518, patch 14
    assert prep.output_size(480, 640) == (392, 392, 0)
    resized, final, offset = prep.output_size(1000, 500)
    assert (final, resized % 14, offset) == (518, 0, (resized - 518) // 2)
    scene_dir = tmp_path / "tall"
    scene_dir.mkdir()
    for i in range(2):
        Image.fromarray((np.random.rand(100, 50, 3) * 255).astype(np.uint8)).save(scene_dir / f"{i}.jpg")
    item = MultiViewFolder(tmp_path, num_views=2)[0]
    assert item["images"].shape == (2, 3, 518, 518)
    assert "depth" not in item and "extrinsics" not in item


def test_bad_inputs_name_the_file_or_scene(tmp_path):
    scene_dir = tmp_path / "s1"
    scene_dir.mkdir()
    Image.fromarray(np.zeros((14, 14, 3), np.uint8)).save(scene_dir / "0.png")
    Image.fromarray(np.zeros((14, 14, 3), np.uint8)).save(scene_dir / "1.png")
    (scene_dir / "2.png").write_bytes(b"not a png at all")
    with pytest.raises(ImageReadError, match="2.png"):
        load_image(scene_dir / "2.png")
    with pytest.raises(ValueError, match="s1 has 3 images, fewer than the 4 views"):
        MultiViewFolder(tmp_path, num_views=4)
    ds = MultiViewFolder(tmp_path, num_views=3, preprocess=Preprocess(width=14))
    with pytest.raises(ImageReadError, match="2.png"):
        ds[0]
    skipping = MultiViewFolder(tmp_path, num_views=2, preprocess=Preprocess(width=14), skip_bad_images=True)
    with pytest.warns(UserWarning, match="2.png"):
        for i in range(6):  # some draws put the corrupt view first
            skipping.length = 6
            assert skipping[i]["images"].shape[0] == 2
    with pytest.raises(ValueError, match="only 2 readable images"):
        MultiViewFolder(tmp_path, num_views=3, preprocess=Preprocess(width=14), skip_bad_images=True)[0]

"""The benchmark scripts that train (benchmarks/train_teacher.py, benchmarks/distill.py) in their
CPU smoke modes: they run end to end and write what they promise. Timings are not checked here."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_train_teacher_tiny_writes_loadable_weights_and_metrics(tmp_path):
    script = _script("train_teacher")
    record = script.main(["--tiny", "--max-steps", "3", "--batch-size", "2", "--assets", str(tmp_path),
                          "--device", "cpu"])
    weights = tmp_path / f"{script.TEACHER_NAME}.safetensors"
    saved = json.loads(weights.with_suffix(".json").read_text())
    assert saved["steps"] == record["steps"] == 3
    assert "train_teacher.py --tiny" in saved["command"]
    for metrics in (saved["heldout"]["teacher"], saved["heldout"]["baselines"]["constant_depth+mean_pose"]):
        assert {"depth_abs_rel", "camera_auc@30", "points_chamfer"} <= metrics.keys()
    correlation = saved["heldout"]["pose_component_correlation"]
    assert tuple(correlation) == script.POSE_COMPONENTS
    assert all(math.isnan(c) or -1 <= c <= 1 for c in correlation.values())
    model, loaded_record = script.load_teacher(weights)
    assert loaded_record["arch"] == saved["arch"]
    # the file holds bf16 weights; the loaded model is those, in float32
    state = model.state_dict()
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert sum(p.numel() for p in model.parameters()) == saved["parameters"]


def test_pose_component_correlation_is_one_for_the_targets_and_follows_their_sign():
    script = _script("train_teacher")
    torch.manual_seed(0)
    # quaternions near the identity (w large), as the relative poses of nearby views are
    near_identity = torch.tensor([0.0] * 6 + [3.0] + [0.0] * 2)
    batches = [{"images": torch.zeros(1, 4, 3, 2, 2), "pose_enc": torch.randn(1, 4, 9) + near_identity}
               for _ in range(3)]

    class Replay(torch.nn.Module):
        def __init__(self, sign):
            super().__init__()
            self.sign, self.calls = sign, iter(batches)

        def forward(self, images):
            return {"pose_enc": self.sign * next(self.calls)["pose_enc"]}

    exact = script.pose_component_correlation(Replay(1.0), batches, autocast=False)
    assert all(abs(c - 1) < 1e-5 for c in exact.values())
    # negated: the translation anti-correlates; -q is the same rotation as q, so it still correlates
    flipped = script.pose_component_correlation(Replay(-1.0), batches, autocast=False)
    assert all(abs(flipped[name] + 1) < 1e-5 for name in ("t_x", "t_y", "t_z"))
    assert all(abs(flipped[name] - 1) < 1e-5 for name in ("q_x", "q_y", "q_z", "q_w"))
    # one quaternion component negated is another rotation: that component anti-correlates
    sign = torch.tensor([1.0] * 4 + [-1.0] + [1.0] * 4)
    one_flipped = script.pose_component_correlation(Replay(sign), batches, autocast=False)
    assert one_flipped["q_y"] < 0 and one_flipped["t_x"] > 0.99


def _room_scenes(script, views=4):
    sampling = script.SceneSampling(image_size=28, views=views, rendered_views=views, compass_walls=True,
                                    room_frame=True)
    return sampling, [script.render_compact(seed, sampling) for seed in (0, 1)]


def test_room_frame_keeps_the_rooms_axes_and_the_relative_poses():
    script = _script("train_teacher")
    sampling, scenes = _room_scenes(script)
    first = script.make_sample(scenes, 4, torch.Generator().manual_seed(0), augment=False)
    room = script.make_sample(scenes, 4, torch.Generator().manual_seed(0), augment=False, room_frame=True)
    R_first, R_room = first["extrinsics"][..., :3], room["extrinsics"][..., :3]
    torch.testing.assert_close(R_first[:, 0], torch.eye(3).expand(2, 3, 3), atol=1e-5, rtol=0)
    # the cameras look roughly level: in the room's frame each rotation is nearly a yaw
    assert (R_room[..., 1, 1] > 0.8).all()
    # the same views: relative rotations agree, and so do the points seen from each camera
    relative = lambda R: R @ R[:, :1].transpose(-1, -2)  # noqa: E731
    torch.testing.assert_close(relative(R_room), R_first, atol=1e-5, rtol=0)
    to_camera = lambda b: torch.einsum("bsij,bshwj->bshwi", b["extrinsics"][..., :3], b["world_points"]) \
        + b["extrinsics"][..., None, None, :, 3]  # noqa: E731
    torch.testing.assert_close(to_camera(room), to_camera(first), atol=1e-4, rtol=1e-4)


def test_room_frame_needs_compass_walls():
    script = _script("train_teacher")
    with pytest.raises(ValueError, match="compass"):
        script.SceneSampling(room_frame=True)


def test_the_pose_loss_scores_a_quaternion_by_the_nearer_sign():
    script = _script("train_teacher")
    torch.manual_seed(0)
    target, pred = torch.randn(2, 3, 9), torch.randn(2, 3, 9)
    negated = torch.cat([pred[..., :3], -pred[..., 3:7], pred[..., 7:]], -1)
    torch.testing.assert_close(script.pose_l1(negated, target, True), script.pose_l1(pred, target, True))
    assert script.pose_l1(pred, target, True) <= script.pose_l1(pred, target, False)
    q_target = torch.cat([target[..., :3], -target[..., 3:7], target[..., 7:]], -1)
    assert script.pose_l1(q_target, target, True) < 1e-6 < script.pose_l1(q_target, target, False)


def test_distill_benchmark_compares_both_modes(tmp_path):
    script = _script("distill")
    assert script.main(["--model", "vggt-tiny", "--frames", "2", "--steps", "3", "--full-steps", "2",
                        "--warmup", "1", "--workers", "1", "--scenes", "2", "--device", "cpu",
                        "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "distill.json").read_text())
    runs = {r["mode"]: r for r in result["runs"]}
    assert runs["sla"]["steps"] == 3 and runs["all"]["steps"] == 2
    assert runs["all"]["trainable_params"] > 100 * runs["sla"]["trainable_params"]
    assert result["sla_vs_full"]["trainable_ratio"] > 100
    assert all(len(r["losses"]) == r["steps"] and r["median_step_s"] > 0 for r in runs.values())


def test_quality_study_tiny_writes_every_row_and_plot_data(tmp_path):
    script = _script("quality")
    assert script.main(["--tiny", "--topk", "0.1", "--steps", "3", "--train-scenes", "2", "--eval-scenes", "2",
                        "--workers", "0", "--long-steps", "4", "--block-q", "16", "--block-k", "16",
                        "--full-finetune", "--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "quality.json").read_text())
    names = [r["variant"] for r in result["rows"]]
    assert names[:6] == ["teacher", "fp8", "sla@0.1", "sla@0.1+distill", "sla+fp8@0.1", "sla+fp8@0.1+distill"]
    assert any("most sensitive" in n for n in names) and any("least sensitive" in n for n in names)
    for row in result["rows"]:
        assert {"depth_abs_rel", "camera_auc@30"} <= row["vs_gt"].keys()
        assert len(row.get("losses", [])) == (row.get("steps", 3) if row["distilled"] else 0)
    assert names[-2:] == ["sla+fp8@0.1+distill, 4 steps", "sla+fp8@0.1+full fine-tuning"]
    assert len(result["rows"][-2]["losses"]) == 4 and len(result["rows"][-1]["losses"]) == 3
    assert result["sla_blocks"] == [16, 16]
    assert result["sensitivity"] and all(b["relative_change"] > 0 for b in result["sensitivity"])
    assert [d["step"] for d in result["drift"]["sla+fp8@0.1+distill"]] == [1, 2, 3]
    assert [d["step"] for d in result["drift"]["sla+fp8@0.1+distill, 4 steps"]] == [1, 2, 3, 4]
    table = (tmp_path / "quality.md").read_text()
    assert all(f"| {n} |" in table for n in names)


def test_quality_study_only_runs_the_named_variants(tmp_path):
    script = _script("quality")
    assert script.main(["--tiny", "--topk", "0.1", "--steps", "2", "--train-scenes", "2", "--eval-scenes", "1",
                        "--workers", "0", "--keep", "0", "--only", "fp8", "sla@*", "--device", "cpu",
                        "--out", str(tmp_path)]) == 0
    names = [r["variant"] for r in json.loads((tmp_path / "quality.json").read_text())["rows"]]
    assert names == ["teacher", "fp8", "sla@0.1", "sla@0.1+distill"]


def test_quality_study_can_give_the_special_tokens_dense_rows(tmp_path):
    script = _script("quality")
    assert script.main(["--tiny", "--topk", "0.1", "--steps", "1", "--train-scenes", "2", "--eval-scenes", "1",
                        "--workers", "0", "--keep", "0", "--only", "sla@0.1", "--dense-special-rows",
                        "--block-q", "16", "--block-k", "16", "--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "quality.json").read_text())
    period, special = result["sla_dense_rows"]
    assert special >= 1 and period == special + 4  # a 28 px tiny teacher: a 2 x 2 patch grid per frame
    assert [r["variant"] for r in result["rows"]] == ["teacher", "sla@0.1"]
    sla = script.variants([0.1], 0, [], 0.1, ("global",), (16, 16), dense_rows=(period, special))[2].config.sla
    assert sla.dense_rows == (period, special)


_SLA_KERNEL_STEPS = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("sla_kernel", sys.argv[1])
sk = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sk)
sk.HEADS = 1
def qkv(batch, n, dtype, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 1, n, 64, generator=g).to(dtype).requires_grad_(requires_grad) for _ in range(3)]
sk._qkv = qkv
sk._proj = lambda seed, zero: (torch.randn(64, 64) * 0.1, torch.randn(64))
sk._bench = sk._bench_graph = lambda fn: (fn(), 1.0)[1]
r = sk.time_sla(1, 300, 0.3, 64, 64)
# the cuBLAS form of the marginal product computes the same sums (bf16 output rounding apart)
assert r["steps_error"]["marginal_sum_cublas_rel_err"] < 1e-2, r["steps_error"]
print(sorted(r["steps"]), r["critical_blocks"], r["key_blocks"])
"""


def test_sla_kernel_benchmark_calls_the_current_kernel_api():
    # The GPU benchmark's step-by-step timing calls the kernels' Python API directly; run it once
    # on the CPU under the Triton interpreter (no timing) so an API change cannot break it unseen.
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", _SLA_KERNEL_STEPS, str(BENCHMARKS / "sla_kernel.py")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "block_statistics_ms" in done.stdout and done.stdout.strip().endswith("2 5")


_SLA_FORWARD_VARIANTS = """
import importlib.util, sys, torch
sys.path.insert(0, sys.argv[2])
spec = importlib.util.spec_from_file_location("sla_forward_variants", sys.argv[1])
fv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fv)
def qkv(batch, n, dtype, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 1, n, 64, generator=g).to(dtype) for _ in range(3)]
fv._qkv = qkv
fv._proj = lambda seed, zero: (torch.randn(64, 64) * 0.1, torch.randn(64))
fv._bench = fv._bench_graph = lambda fn: (fn(), 1.0)[1]
fv.HEADS = 1
from lite3r_compile.sla.config import SLAConfig
config = SLAConfig(topk=0.3, block_q=64, block_k=64)
times, inputs = fv.steps(300, config)
assert times["marginal_sum_cublas_rel_err"] < 1e-2, times
assert times["non_kernel_graph_ms"] == 3.0, times
assert times["full_search_classes_equal"] is True and times["classify_full_search_ms"] == 0.0, times
assert fv._launch_config("4x3") == (4, 3, None) and fv._launch_config("4x3r168") == (4, 3, 168)
rows = fv.kernel_configs(300, config, inputs, [fv._launch_config("4x3")], False)
assert [r.get("autotuned", False) for r in rows] == [False, False, True, True], rows
assert [r["tma"] for r in rows] == [False, True, False, True], rows
assert all(r["rel_err"] < 1e-2 and r["ms"] == 1.0 for r in rows), rows
print("ok", sorted(times))
"""


def test_sla_forward_variants_benchmark_times_the_steps_and_launch_configs():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", _SLA_FORWARD_VARIANTS,
                           str(BENCHMARKS / "sla_forward_variants.py"), str(BENCHMARKS)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("ok")


def test_sla_kernel_results_are_rebuilt_from_a_log_cut_by_a_time_limit(tmp_path):
    sla_kernel = _script("sla_kernel")
    sla = {"fwd_ms": 2.0, "fwd_bwd_ms": 9.0, "fwd_graph_ms": 1.9, "kernel_tflops_on_computed_blocks": 300.0,
           "overhead_fraction": 0.2}
    frame = {"scope": "frame", "frames": 1, "N": 1374, "batch": 32, "topk": 0.25,
             "sdpa": {"fwd_ms": 0.9, "fwd_bwd_ms": 4.0}, "sla": sla}
    log = tmp_path / "kernels.log"
    log.write_text("\n".join([
        "correctness global_fwd: {'N': 43968, 'o': 0.0017}",
        "global N=43968: sdpa {'fwd_ms': 25.0, 'fwd_bwd_ms': 95.8}",
        f"  topk=0.1: sla {json.dumps(sla)}",
        "  topk=0.1: flex null",
        f"  topk=0.2: sla {json.dumps(sla)}",
        '  topk=0.2: flex {"fwd_ms": 4.4}',
        f"  topk=0.5: sla {json.dumps(sla)}",  # cut here: no flex line, the row never finished
        f"frame: {json.dumps(frame)}",
        "Traceback (most recent call last):",
    ]))
    result = sla_kernel.result_from_log(log, "NVIDIA H200")
    assert result["correctness"] == {"global_fwd": {"N": 43968, "o": 0.0017}}
    global_rows = [r for r in result["sweep"] if r["scope"] == "global"]
    assert [(r["N"], r["frames"], r["topk"]) for r in global_rows] == [(43968, 32, 0.1), (43968, 32, 0.2)]
    assert "flex" not in global_rows[0] and global_rows[1]["flex"] == {"fwd_ms": 4.4}
    assert global_rows[0]["sdpa"]["fwd_ms"] == 25.0
    assert result["sweep"][-1] == frame
    assert "frame" in sla_kernel.summary_table(result)


def test_compile_overhead_builds_a_shortened_vggt_1b_at_full_width():
    compile_overhead = _script("compile_overhead")
    spec, model = compile_overhead.build(1, torch.device("cpu"))
    assert model.aggregator.frame_blocks[0].attn.qkv.in_features == 1024  # VGGT-1B's width
    assert len(model.aggregator.frame_blocks) == 1
    from lite3r_compile.bench.models import make_images

    with torch.no_grad():
        out = model(make_images(spec, 1, "cpu"))
    assert out["depth"].shape == (1, 1, 518, 518, 1) and torch.isfinite(out["depth"]).all()


def test_kernel_sources_copies_every_kernel_file_defining_each_hot_inductor_kernel(tmp_path):
    script = _script("kernel_sources")
    cache = tmp_path / "cache"
    (cache / "ab").mkdir(parents=True)
    # a graph's output code defines its kernels and `call`: not a kernel's own file
    (cache / "ab" / "graph.py").write_text("def triton_red_fused_gelu_1(x):\n    pass\n"
                                           "def triton_per_fused_ln_2(x):\n    pass\ndef call(args):\n    pass\n")
    (cache / "ab" / "kernel.py").write_text("def triton_red_fused_gelu_1(x):\n    pass\n")
    # the same name in another graph (Inductor numbers kernels per graph): another kernel
    (cache / "ab" / "other_graph_kernel.py").write_text("def triton_red_fused_gelu_1(y):\n    pass  # float32\n")
    (cache / "ab" / "ln.py").write_text("def triton_per_fused_ln_2(x):\n    pass\n")
    result = {"runs": [
        {"model": "m", "frames": 8, "variant": "student_fp8_sla", "top_kernels": [
            {"name": "nvjet_gemm", "calls": 4, "ms": 9.0},  # not Inductor's: not looked for
            {"name": "triton_red_fused_gelu_1", "calls": 48, "ms": 7.9},
            {"name": "triton_per_fused_ln_2", "calls": 96, "ms": 3.0},
            {"name": "triton_poi_fused_gone_3", "calls": 2, "ms": 1.0},
        ]},
        {"model": "m", "frames": 8, "variant": "dense_eager", "top_kernels": None},
    ]}
    (tmp_path / "e2e.json").write_text(json.dumps(result))
    out = tmp_path / "kernels"
    assert script.main([str(tmp_path / "e2e.json"), "--cache-dir", str(cache), "--out", str(out)]) == 0
    index = json.loads((out / "index.json").read_text())
    assert set(index) == {"triton_red_fused_gelu_1", "triton_per_fused_ln_2", "triton_poi_fused_gone_3"}
    assert sorted(Path(p).name for p in index["triton_red_fused_gelu_1"]["sources"]) == [
        "kernel.py", "other_graph_kernel.py"]
    assert [Path(p).name for p in index["triton_per_fused_ln_2"]["sources"]] == ["ln.py"]
    assert index["triton_poi_fused_gone_3"]["sources"] == []
    assert index["triton_red_fused_gelu_1"]["runs"] == ["m S=8 student_fp8_sla: 7.90 ms over 48 calls"]
    copies = sorted(out.glob("triton_red_fused_gelu_1.*.py"))
    assert len(copies) == 2 and all("7.90 ms over 48 calls" in c.read_text() for c in copies)
    assert any("float32" in c.read_text() for c in copies)
    assert not any("def call(" in c.read_text() for c in out.glob("*.py"))


def test_special_token_query_blocks_are_found_and_the_override_is_undone():
    from lite3r_compile.sla import reference
    from lite3r_compile.sla.config import SLAConfig

    script = _script("sla_special_tokens")
    # 3 frames of 40 tokens (2 special), blocks of 16: rows 0-1, 40-41, 80-81
    assert script.special_query_blocks(120, 40, 2, 16) == [0, 2, 5]
    q, k = torch.randn(1, 1, 120, 8), torch.randn(1, 1, 120, 8)
    config = SLAConfig(topk=0.25, block_q=16, block_k=16)
    original = reference.classify_blocks
    with script.special_queries_dense(40, 2):
        classes = reference.classify_blocks(q, k, config)
        frame = reference.classify_blocks(q[:, :, :40], k[:, :, :40], config)
    assert reference.classify_blocks is original
    assert (classes[0, 0, [0, 2, 5]] == reference.CRITICAL).all()
    assert (classes[0, 0, [1, 3, 4, 6, 7]] == reference.CRITICAL).sum(-1).tolist() == [2] * 5  # topk 0.25 of 8
    assert torch.equal(frame, original(q[:, :, :40], k[:, :, :40], config))  # one frame: untouched


def test_special_tokens_diagnostic_runs_on_a_tiny_teacher(tmp_path):
    tt = _script("train_teacher")
    tt.main(["--tiny", "--max-steps", "2", "--batch-size", "2", "--assets", str(tmp_path), "--device", "cpu"])
    script = _script("sla_special_tokens")
    rows = script.main(["--teacher", str(tmp_path / f"{tt.TEACHER_NAME}.safetensors"), "--block", "16",
                        "--eval-scenes", "1", "--out", str(tmp_path / "special.json")])
    assert [r["model"] for r in rows][0] == "teacher" and len(rows) == 3
    assert json.loads((tmp_path / "special.json").read_text())["rows"] == rows

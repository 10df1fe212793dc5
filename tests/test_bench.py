"""The end-to-end benchmark (lite3r_compile.bench, `lite3r bench`) on tiny presets on the CPU."""

from __future__ import annotations

import argparse
import gc
import json
import math
from pathlib import Path

import pytest
import torch

from lite3r_compile.bench import breakdown as bd
from lite3r_compile.bench import gemm
from lite3r_compile.bench.models import Float32Head, build_model, make_images, model_spec, output_tensors
from lite3r_compile.bench.timing import relative_errors, worst
from lite3r_compile.bench.variants import VARIANTS, weight_bytes
from lite3r_compile.commands import bench as bench_command

RUN_KEYS = {"model", "frames", "variant", "latency_ms", "samples_ms", "first_call_s", "compile_s", "compiled",
            "weight_bytes", "working_bytes", "peak_bytes", "backend", "wall_s"}


def _run(tmp_path, *extra: str) -> dict:
    parser = argparse.ArgumentParser()
    bench_command.add_arguments(parser)
    args = parser.parse_args([
        "--device", "cpu", "--frames", "2", "--out", str(tmp_path), "--student-backend", "eager",
        "--compile-backend", "eager", "--breakdown-frames", "2", "--target-s", "0", "--min-iters", "1",
        "--max-iters", "1", "--time-budget-s", "100000", *extra,
    ])
    assert bench_command.run(args) == 0
    return json.loads((tmp_path / "e2e.json").read_text())


def _check_schema(result: dict, model: str, skipped_variants: set[str], exact_max: float = 1e-2) -> None:
    assert {"meta", "config", "models", "runs", "skipped", "exact_checks", "claims", "elapsed_s"} <= set(result)
    assert result["models"][model]["parameters"] > 0
    ran = {r["variant"]: r for r in result["runs"] if r["model"] == model}
    skipped = {s["variant"]: s for s in result["skipped"] if s["model"] == model}
    # every variant ran or was skipped with a reason, never both, never silently dropped
    assert set(ran) | set(skipped) == set(VARIANTS)
    assert not set(ran) & set(skipped)
    assert set(skipped) == skipped_variants
    for s in skipped.values():
        assert s["reason"]
    for variant, r in ran.items():
        assert "error" not in r, r["error"]
        assert RUN_KEYS <= set(r), RUN_KEYS - set(r)
        assert r["frames"] == 2
        assert math.isfinite(r["latency_ms"]) and r["latency_ms"] > 0
        assert r["weight_bytes"] > 0
        assert r["backend"]["ran"]
        b = r["breakdown"]
        for c in (*bd.CATEGORIES, "heads", "busy_ms", "span_ms"):
            assert math.isfinite(b[c]) and b[c] >= 0
        assert b["heads_marked"] and b["heads"] > 0  # the head marker split the trace
        if variant.startswith("student_"):
            err = r["error_vs_eager_student"]
            assert set(err["per_key"]) and all(math.isfinite(v) for v in err["per_key"].values())
            assert math.isfinite(err["max"]) and err["max"] < 2e-2
        if variant != "dense_eager":
            assert math.isfinite(r["error_vs_dense_eager"]["max"])
    fp8_only = ran["student_fp8_only"]["linear_vs_gemm"]
    assert fp8_only["rates"] and all(row["bf16_ms"] > 0 for row in fp8_only["rates"])
    assert fp8_only["expected"]["calls"] > 0 and fp8_only["expected"]["fp8_calls"] > 0
    exact = [e for e in result["exact_checks"] if e["model"] == model]
    assert len(exact) == 1 and math.isfinite(exact[0]["max"]) and exact[0]["max"] < exact_max
    names = {c["claim"] for c in result["claims"] if c["model"] == model}
    assert any("exact student" in n for n in names)
    assert all(c["passed"] in (True, False, None) for c in result["claims"])


def test_bench_vggt_tiny_every_variant(tmp_path):
    # float32: a random-weight VGGT's camera tokens are ~400x smaller than its patch tokens, so in
    # bfloat16 the different rounding of SLA and SDPA alone moves pose_enc by ~1e-2 relative
    # (1.07e-2 on one CPU, under 1e-2 on another); in float32 the topk=1 student must be exact
    result = _run(tmp_path, "--models", "vggt-tiny", "--dtype", "float32")
    assert result["config"]["dtype"] == "float32"
    _check_schema(result, "vggt-tiny", set(), exact_max=1e-5)
    runs = {r["variant"]: r for r in result["runs"]}
    assert runs["dense_compiled"]["compiled"] and runs["dense_compiled"]["compile_s"] > 0
    assert not runs["dense_eager"]["compiled"]
    # the SLA students rewrote attention; the FP8-only one has FP8 layers and no SLA
    assert runs["student_fp8_sla"]["backend"]["sla_sites_rewritten"] > 0
    assert runs["student_fp8_only"]["backend"]["sla_sites_rewritten"] == 0
    assert runs["student_fp8_only"]["backend"]["fp8_layers"] > 0
    assert runs["student_sla_only"]["backend"]["fp8_layers"] == 0
    assert result["plot"].get("path") or result["plot"].get("skipped")


def test_bench_students_with_bfloat16_heads_deploy_them(tmp_path):
    # the fp8 backend on a CPU runs the deployed form uncompiled: its heads are the bf16 ones
    result = _run(tmp_path, "--models", "vggt-tiny", "--variants", "dense_eager", "student_fp8_sla",
                  "--student-backend", "fp8", "--bf16-dense-heads", "--no-exact-check", "--no-plot")
    assert result["config"]["students"]["bf16_dense_heads"] is True
    student = next(r for r in result["runs"] if r["variant"] == "student_fp8_sla")
    assert "error" not in student, student["error"]
    assert student["backend"]["deployed"]["bf16_heads"] == 2  # the depth and point heads
    # the heads' outputs (the random-weight camera head amplifies the deployed FP8 GEMMs' float32
    # rounding against the bf16 fake-quant ones to ~4e-2 with or without bf16 heads: not checked)
    errors = student["error_vs_eager_student"]["per_key"]
    assert errors["depth"] < 1e-2 and errors["world_points"] < 1e-2, errors


def test_bench_da3_tiny_skips_what_does_not_fit(tmp_path):
    # a compile estimate far beyond the budget: the compiled variant is skipped, with the reason
    result = _run(tmp_path, "--models", "da3-tiny", "--compile-estimate-s", "1e9", "--no-plot")
    _check_schema(result, "da3-tiny", {"dense_compiled"})
    assert "time budget" in result["skipped"][0]["reason"]


def test_float32_heads_behind_a_bf16_backbone():
    spec = model_spec("vggt-tiny")
    model = build_model(spec, "cpu")
    assert isinstance(model.depth_head, Float32Head)
    assert model.aggregator.frame_blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.depth_head.parameters())
    with torch.no_grad():
        out = output_tensors(model(make_images(spec, 2, "cpu")), spec.passthrough_outputs)
    assert out["depth"].dtype == torch.float32 and "images" not in out
    # same seed, same weights
    again = build_model(spec, "cpu")
    assert torch.equal(again.aggregator.frame_blocks[0].attn.qkv.weight, model.aggregator.frame_blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("name, category", [
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("_sla_fwd_kernel", "attention"),
    ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "linear"),
    ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128", "linear"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwc", "conv"),
    ("triton_red_fused__to_copy_abs_amax_clamp_div_native_layer_norm_3", "quantization"),
    # Inductor names the fused LayerNorm + absmax kernel after the _scaled_mm it feeds too
    ("triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_native_layer_norm_t_view_0", "quantization"),
    ("layernorm_quant_rows", "quantization"),
    ("gelu_quant_rows", "quantization"),
    ("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda, c10::Float8_e4m3fn>", "quantization"),
    ("triton_per_fused_native_layer_norm_7", "norm_elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>", "norm_elementwise"),
    ("Memcpy DtoD (Device -> Device)", "other"),
    ("aten::addmm", "linear"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
])
def test_kernel_categories(name, category):
    assert bd.classify(name) == category


def test_cpu_breakdown_self_time_heads_and_attention_children():
    events = [  # µs; a forward: attention op with a nested matmul, a linear, the head marker, a head conv
        {"ph": "X", "cat": "cpu_op", "name": "lite3r::sla_forward", "ts": 0, "dur": 10, "pid": 1, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::bmm", "ts": 2, "dur": 6, "pid": 1, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::addmm", "ts": 12, "dur": 5, "pid": 1, "tid": 1},
        {"ph": "X", "cat": "user_annotation", "name": "lite3r.bench.heads.depth_head", "ts": 20, "dur": 0, "pid": 1, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::convolution", "ts": 21, "dur": 7, "pid": 1, "tid": 1},
    ]
    b = bd.breakdown(events, torch.device("cpu"))
    assert b["attention"] == pytest.approx(0.010)  # 4 µs self + 6 µs nested matmul
    assert b["linear"] == pytest.approx(0.005)
    assert b["conv"] == 0 and b["heads"] == pytest.approx(0.007) and b["heads_detail"]["conv"] == pytest.approx(0.007)
    assert b["busy_ms"] == pytest.approx(0.022)


def test_cuda_breakdown_splits_at_the_marker_kernel():
    def kernel(name, ts, dur):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 7}

    events = [
        kernel("nvjet_tst_128x256_64x4_2x1_v_bz_TNT", 0, 100),
        kernel("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", 110, 200),
        kernel("triton_red_fused__to_copy_abs_amax_clamp_div_native_layer_norm_0", 320, 30),
        {"ph": "X", "cat": "cpu_op", "name": "aten::addmm", "ts": 0, "dur": 999, "pid": 1, "tid": 1},
        kernel("spin_kernel(long)", 400, 1),
        kernel("sm90_xmma_fprop_implicit_gemm_f32f32_tf32f32_f32_nhwckrsc_nchw", 410, 50),
        kernel("nvjet_tst_64x8_64x16_4x1_v_bz_TNN", 470, 10),
    ]
    b = bd.breakdown(events, torch.device("cuda"))
    assert (b["linear"], b["attention"], b["quantization"]) == pytest.approx((0.1, 0.2, 0.03))
    assert b["heads"] == pytest.approx(0.06) and b["heads_detail"]["conv"] == pytest.approx(0.05)
    assert b["busy_ms"] == pytest.approx(0.39) and b["span_ms"] == pytest.approx(0.48)
    assert [k["name"][:6] for k in bd.top_kernels(events, torch.device("cuda"), n=2)] == ["pytorc", "nvjet_"]


def test_relative_errors_flag_nan_and_shape_mismatch():
    ref = {"a": torch.ones(4), "b": torch.ones(3), "c": torch.ones(2)}
    out = {"a": torch.ones(4) * 1.01, "b": torch.tensor([1.0, float("nan"), 1.0]), "c": torch.ones(3)}
    errors = relative_errors(out, ref)
    assert errors["a"] == pytest.approx(0.01)
    assert math.isnan(errors["b"]) and math.isnan(errors["c"])
    assert math.isnan(worst(errors)) and worst({"a": 0.1, "b": 0.2}) == 0.2


def test_weight_bytes_counts_shared_storage_once():
    a = torch.nn.Linear(8, 8)
    b = torch.nn.Linear(8, 8)
    b.weight = a.weight
    assert weight_bytes([a, b]) == (64 + 8 + 8) * 4


def test_expected_linear_time_uses_fp8_rate_for_fp8_layers_only():
    calls = [gemm.LinearCall("blocks.0.fc1", 16, 32, 64, True, "bfloat16"),
             gemm.LinearCall("blocks.0.fc2", 16, 64, 32, True, "bfloat16"),
             gemm.LinearCall("head.fc", 16, 32, 64, True, "float32")]
    rates = [{"m": 16, "k": 32, "n": 64, "bias": True, "bf16_ms": 2.0, "fp8_ms": 1.0},
             {"m": 16, "k": 64, "n": 32, "bias": True, "bf16_ms": 3.0, "fp8_ms": 1.5}]
    expected = gemm.expected_linear_ms(calls, {"blocks.0.fc1"}, rates, ("head",))
    assert expected == {"calls": 2, "fp8_calls": 1, "bf16_ms": 5.0, "fp8_student_ms": 4.0}
    assert gemm.shapes_of(calls, ("head",)) == {(16, 32, 64, True), (16, 64, 32, True)}


def test_compile_watch_reports_frames_compiled_during_the_timed_calls():
    # A guard that fails on every call (here: a global read by the compiled function changes)
    # makes every "timed" call a compile; the watch must say so instead of reporting a latency.
    from lite3r_compile.bench.timing import time_forward
    from lite3r_compile.bench.variants import CompileWatch

    state = {"offset": 0}

    @torch.compile(backend="eager", dynamic=False)
    def shifted(x):
        return x + state["offset"]

    def call():
        state["offset"] += 1
        return shifted(torch.ones(2))

    def steady():
        return shifted(torch.ones(2))

    torch._dynamo.reset()
    with CompileWatch() as watch:
        time_forward(call, torch.device("cpu"), target_s=0.0, min_iters=3, max_iters=3, after_warmup=watch.mark_warm)
    assert watch.summary()["frames_compiled_while_timed"] == 3

    torch._dynamo.reset()
    with CompileWatch() as watch:
        time_forward(steady, torch.device("cpu"), target_s=0.0, min_iters=3, max_iters=3, after_warmup=watch.mark_warm)
    assert watch.summary()["frames_compiled_while_timed"] == 0
    assert watch.graphs == 1
    assert watch.summary()["cudagraph_skips"] == 0


def test_compile_watch_counts_graphs_inductor_would_not_record_as_cuda_graphs():
    from lite3r_compile.bench.variants import CompileWatch

    torch._dynamo.reset()
    # CUDA graphs asked for on CPU tensors: Inductor compiles the graph and skips the recording
    doubled = torch.compile(lambda x: x * 2 + 1, mode="reduce-overhead")
    with torch._inductor.config.patch(compile_threads=1), CompileWatch() as watch:
        doubled(torch.ones(4))
    assert watch.summary()["cudagraph_skips"] == 1
    torch._dynamo.reset()


def test_a_result_cut_short_is_resumed_without_running_its_finished_runs_again(tmp_path):
    first = _run(tmp_path, "--models", "vggt-tiny", "--variants", "dense_eager", "student_fp8_sla",
                 "--student-backend", "eager", "--no-plot")
    previous = tmp_path / "first.json"
    previous.write_text(json.dumps(first))
    second = _run(tmp_path, "--models", "vggt-tiny", "--variants", "dense_eager", "student_fp8_sla",
                  "student_fp8_only", "--student-backend", "eager", "--no-plot", "--resume", str(previous))
    runs = {r["variant"]: r for r in second["runs"]}
    assert set(runs) == {"dense_eager", "student_fp8_sla", "student_fp8_only"}
    kept = next(r for r in first["runs"] if r["variant"] == "student_fp8_sla")
    assert runs["student_fp8_sla"] == {**kept, "resumed_from": str(previous)}
    assert "resumed_from" not in runs["student_fp8_only"] and "resumed_from" not in runs["dense_eager"]
    assert second["exact_checks"][0]["resumed_from"] == str(previous)
    assert second["meta"]["resumed_from"] == str(previous)


def test_resuming_a_result_of_another_configuration_is_refused_with_the_differences(tmp_path):
    first = _run(tmp_path, "--models", "vggt-tiny", "--variants", "dense_eager", "--no-exact-check",
                 "--no-plot")
    previous = tmp_path / "first.json"
    previous.write_text(json.dumps(first))
    with pytest.raises(SystemExit, match=r"another configuration; students: .*'topk': 0.1.*'topk': 0.2"):
        _run(tmp_path, "--models", "vggt-tiny", "--variants", "dense_eager", "--no-plot", "--topk", "0.2",
             "--resume", str(previous))


def test_error_claims_name_their_worst_output_and_the_compile_floor_on_it():
    from lite3r_compile.bench.claims import check_claims

    def run(variant, latency, **errors):
        return {"model": "m", "frames": 8, "variant": variant, "latency_ms": latency, **errors}

    runs = [
        run("dense_eager", 100.0),
        run("dense_compiled", 80.0, error_vs_dense_eager={"per_key": {"pose": 0.035, "depth": 1e-4}, "max": 0.035}),
        run("student_fp8_sla", 50.0, error_vs_eager_student={"per_key": {"pose": 0.09, "depth": 2e-3}, "max": 0.09}),
    ]
    exact = [{"model": "m", "frames": 8, "per_key": {"pose": 0.03, "depth": 5e-5}, "max": 0.03}]
    claims = {c["claim"]: c for c in check_claims(runs, exact) if c["frames"] == 8}
    student = claims["student_fp8_sla vs eager fake-quant student (max rel err)"]
    assert student["passed"] is False  # the floor is reported, it does not excuse the error
    assert student["worst_output"] == "pose" and student["floor"] == 0.035
    exact_claim = claims["exact student (topk=1, no FP8) vs dense teacher (max rel err)"]
    assert exact_claim["worst_output"] == "pose" and exact_claim["floor"] == 0.035
    # without a dense compiled run there is no floor to give
    bare = {c["claim"]: c for c in check_claims(runs[::2], exact) if c["frames"] == 8}
    assert "floor" not in bare["student_fp8_sla vs eager fake-quant student (max rel err)"]


def test_compile_dense_block_by_block_shares_the_weights_and_leaves_the_model_eager():
    from lite3r_compile.bench.models import build_model, make_images, model_spec
    from lite3r_compile.bench.variants import compile_dense

    torch._dynamo.reset()
    spec = model_spec("vggt-tiny")
    model = build_model(spec, "cpu")
    images = make_images(spec, 2, "cpu")
    compiled = compile_dense(model, "eager", regional=True)
    assert compiled is not model
    assert compiled.aggregator.frame_blocks[0]._compiled_call_impl is not None
    assert model.aggregator.frame_blocks[0]._compiled_call_impl is None  # the teacher stays eager
    shared = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in shared for p in compiled.parameters())
    with torch.no_grad():
        torch.testing.assert_close(compiled(images)["depth"], model(images)["depth"])
    with pytest.raises(ValueError, match="Inductor options"):
        compile_dense(model, "eager", regional=True, cuda_graphs=True)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_working_memory_counts_what_a_cuda_graph_keeps_in_its_pool():
    # a graph whose intermediate (64 MiB) lives only inside it: after recording, that buffer is a
    # free block of the graph's pool, which memory_allocated does not count and a replay does not
    # allocate; the working memory must still include it
    from lite3r_compile.bench.timing import graph_pool_free_bytes, time_forward

    device = torch.device("cuda")
    x = torch.randn(4096, 4096, device=device)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        (x * 2).sum()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    state = {}

    def record():
        if "graph" not in state:
            with torch.cuda.graph(graph):
                state["out"] = (x * 2 + 1).sum()
            state["graph"] = graph
        state["graph"].replay()
        return state["out"]

    # time_forward collects garbage and empties the cache, which releases the pools of graphs that
    # earlier tests in this process left behind: release them before counting, not during the test
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = graph_pool_free_bytes(device)
    timing = time_forward(record, device, target_s=0.0, min_iters=3, max_iters=3)
    intermediate = x.numel() * x.element_size()
    assert graph_pool_free_bytes(device) - before >= intermediate
    assert timing.graph_pool_free_bytes >= intermediate
    assert timing.working_bytes >= intermediate


def test_live_memory_counts_a_storage_until_its_last_view_dies():
    from lite3r_compile.bench.live_memory import LiveMemory

    memory = LiveMemory()
    with memory:
        memory.label = "first"
        a = torch.ones(256)  # 1 KiB
        b = a.view(16, 16)  # the same storage
        del a
        memory.label = "second"
        c = torch.ones(512)  # 2 KiB
        assert memory.live_bytes == 3072
        del b
        assert memory.live_bytes == 2048
        d = c * 2  # a new 2 KiB storage: the peak is now 4 KiB
        del c, d
    assert memory.live_bytes == 0
    assert memory.peak_bytes == 4096 and "mul" in memory.peak_op and "second" in memory.peak_op
    assert memory.by_label() == {"second": 4096}


def test_memory_trace_of_a_tiny_model_on_meta(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_trace.py"
    spec = importlib.util.spec_from_file_location("memory_trace", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    one, two = script.main(["--model", "vggt-tiny", "--frames", "1", "2", "--out", str(tmp_path / "trace.json")])
    assert one["weight_bytes"] == two["weight_bytes"] > 0
    assert 0 < one["peak_activation_bytes"] < two["peak_activation_bytes"]
    assert json.loads((tmp_path / "trace.json").read_text())[1]["frames"] == 2


def test_memory_options_reach_the_timed_students_only():
    from lite3r_compile.bench.variants import EXACT_STUDENT, StudentOptions, student_plan

    options = StudentOptions(bf16_all_heads=True, head_frames_chunk=4)
    for name in ("student_fp8_sla", "student_fp8_only", "student_sla_only"):
        _, config = student_plan(name, options, dense_heads=("depth_head",))
        assert config.bf16_heads == ("*",) and config.head_frames_chunk == 4
    _, exact = student_plan(EXACT_STUDENT, options, dense_heads=("depth_head",))
    assert exact.bf16_heads == () and exact.head_frames_chunk is None
    _, dense_only = student_plan("student_fp8_sla", StudentOptions(bf16_dense_heads=True), dense_heads=("depth_head",))
    assert dense_only.bf16_heads == ("depth_head",) and dense_only.head_frames_chunk is None


def test_dense_special_rows_come_from_the_model_and_reach_the_sla_students():
    from lite3r_compile.bench.variants import EXACT_STUDENT, StudentOptions, special_token_rows, student_plan

    spec = model_spec("vggt-tiny")
    model = build_model(spec, "cpu")
    images = make_images(spec, 2, "cpu")
    rows = special_token_rows(model, images)
    assert rows == (model.aggregator.patch_start_idx + 4, model.aggregator.patch_start_idx)  # 28 px: 2 x 2 patches
    options = StudentOptions(dense_special_rows=True)
    for name in ("student_fp8_sla", "student_sla_only"):
        assert student_plan(name, options, dense_rows=rows)[1].sla.dense_rows == rows
    assert student_plan(EXACT_STUDENT, options, dense_rows=rows)[1].sla.dense_rows is None
    assert student_plan("student_fp8_sla", StudentOptions(), dense_rows=rows)[1].sla.dense_rows is None
    with pytest.raises(ValueError, match="dense-special-rows"):
        special_token_rows(torch.nn.Linear(2, 2), images)


def test_bench_runs_the_sla_students_with_dense_special_rows(tmp_path):
    result = _run(tmp_path, "--models", "vggt-tiny", "--variants", "dense_eager", "student_fp8_sla",
                  "--dense-special-rows", "--no-exact-check", "--no-plot")
    assert result["config"]["students"]["dense_special_rows"] is True
    student = next(r for r in result["runs"] if r["variant"] == "student_fp8_sla")
    assert "error" not in student, student["error"]
    assert student["latency_ms"] > 0
    # and the students built that way carry the rows at every SLA site
    from lite3r_compile.bench.variants import StudentOptions, build_students, special_token_rows
    from lite3r_compile.sla import SparseLinearAttention

    spec = model_spec("vggt-tiny")
    teacher, images = build_model(spec, "cpu"), make_images(spec, 2, "cpu")
    built = build_students(teacher, ["student_fp8_sla"], StudentOptions(dense_special_rows=True, backend="eager"),
                           (images,), references=False)
    sites = [m for m in built.timed["student_fp8_sla"].modules() if isinstance(m, SparseLinearAttention)]
    assert sites and all(m.config.dense_rows == special_token_rows(teacher, images) for m in sites)

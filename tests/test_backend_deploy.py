"""Deployment lowering of lite students: float8 weights, the compiled eval-mode form, and the
eval-mode router that keeps it in step with the student's weights."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lite3r_compile.api import lite
from lite3r_compile.backends.deploy import (
    EagerForHooksWarning,
    deploy,
    install_eval_backend,
)
from lite3r_compile.backends.fp8_linear import Float8Linear
from lite3r_compile.config import FP8Config, LiteConfig
from lite3r_compile.passes.fp8_qat import FP8FakeQuantLinear
from lite3r_compile.sla.config import SLAConfig

DIM, HEADS, TOKENS = 32, 2, 32
# frame attention sees 2 key blocks of 16 tokens, global attention 2 * S: both have marginal
# blocks, so the linear branch (proj_l) takes part
BLOCKS = SLAConfig(topk=0.5, block_q=16, block_k=16)


class Attention(nn.Module):
    def __init__(self, manual: bool):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.manual = manual

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        if self.manual:
            a = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
            x = a.softmax(dim=-1) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, manual: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.attn = Attention(manual)
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Frames(nn.Module):
    """Tokens (B, S, P, C) -> per-frame block (SDPA) -> global block over S*P tokens (manual
    attention) -> head (B, S, P, 3)."""

    def __init__(self, frame_block: bool = True):
        super().__init__()
        # without the frame block: half the kernels for Inductor to compile on a CI CPU
        self.frame_block = Block(manual=False) if frame_block else nn.Identity()
        self.global_block = Block(manual=True)
        self.head = nn.Linear(DIM, 3)

    def forward(self, tokens):
        b, s, p, c = tokens.shape
        x = self.frame_block(tokens.reshape(b * s, p, c))
        x = self.global_block(x.reshape(b, s * p, c))
        return self.head(x).reshape(b, s, p, 3)

    def example_inputs(self):
        weight = self.head.weight  # on the model's device and in its dtype
        x = torch.randn(1, 2, TOKENS, DIM, generator=torch.Generator().manual_seed(0))
        return (x.to(weight.device, weight.dtype),)


def make_teacher(seed: int = 0, frame_block: bool = True) -> Frames:
    torch.manual_seed(seed)
    return Frames(frame_block).eval()


def make_student(teacher: nn.Module, backend: str = "fp8", **config) -> nn.Module:
    config.setdefault("sla", BLOCKS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = lite(teacher, backend=backend, config=LiteConfig(**config))
    rewritten = [s.path for s in student.lite3r_record.passes.artifacts["sla_sites"] if s.rewritten]
    expected = ["frame_block.attn", "global_block.attn"]
    if isinstance(teacher.frame_block, nn.Identity):
        expected = expected[1:]
    assert rewritten == expected, rewritten
    with torch.no_grad():  # a "trained" student: non-zero projections, so proj_l matters
        for name, p in student.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return student.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tokens(frames: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, frames, TOKENS, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._inductor.config.patch(compile_threads=1):  # no worker pool on a 2-core CI box
        yield
    torch._dynamo.reset()


def _eager(student, *args):
    """The student's own (fake-quant, SLA reference) forward, whatever router is installed."""
    with torch.no_grad():
        return type(student).forward(student, *args)


def test_fp8_lowering_stores_float8_weights_and_computes_what_the_student_computes():
    student = make_student(make_teacher())
    with pytest.warns(UserWarning, match="no FP8 GEMMs"):
        deployed = deploy(student, "fp8", compile=False)
    fq_paths = sorted(p for p, m in student.named_modules() if isinstance(m, FP8FakeQuantLinear))
    assert fq_paths and sorted(deployed.record.float8_layers) == fq_paths
    assert deployed.record.fp8_emulated and not deployed.record.compiled
    modules = dict(deployed.module.named_modules())
    for path in fq_paths:
        layer = modules[path]
        assert isinstance(layer, Float8Linear)
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.element_size() == 1
        assert layer.weight_scale.shape == (layer.out_features, 1)  # rowwise, the default
    assert isinstance(modules["head"], nn.Linear) and not isinstance(modules["head"], Float8Linear)
    # every block's LayerNorm runs inside the quantization of the layer it feeds
    assert deployed.record.layernorm_fused == [
        (f"{block}.norm{i}", f"{block}.{layer}") for block in ("frame_block", "global_block")
        for i, layer in ((1, "attn.qkv"), (2, "mlp.0"))]
    assert deployed.record.layernorm_kept == []
    moved = {f"{layer}.input_norm.": f"{norm}." for norm, layer in deployed.record.layernorm_fused}
    # everything but the float8 layers shares the student's storage (no second copy)
    student_params = dict(student.named_parameters())
    for name, p in deployed.module.named_parameters():
        assert not p.requires_grad
        prefix = next((k for k in moved if name.startswith(k)), None)
        source = name if prefix is None else moved[prefix] + name[len(prefix):]
        assert p.data_ptr() == student_params[source].data_ptr(), name
    x = tokens(2)
    with torch.no_grad():
        out = deployed(x)
    # same rounding as the fake-quant layers; float32 products in another order
    assert rel_err(out, _eager(student, x)) < 1e-5


def test_tensorwise_scales_lower_to_one_scale_per_layer():
    student = make_student(make_teacher(), fp8=FP8Config(granularity="tensorwise"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deployed = deploy(student, "fp8", compile=False)
    layer = deployed.module.global_block.mlp[0]
    assert isinstance(layer, Float8Linear) and layer.weight_scale.shape == ()
    x = tokens(2)
    with torch.no_grad():
        assert rel_err(deployed(x), _eager(student, x)) < 1e-5


def test_weight_only_fake_quant_is_kept_and_said_so():
    student = make_student(make_teacher(), fp8=FP8Config(quantize_activations=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deployed = deploy(student, "fp8", compile=False)
    assert not deployed.record.float8_layers
    assert deployed.record.fake_quant_layers and all(
        "weight-only" in why for _, why in deployed.record.fake_quant_layers
    )


def test_compiled_fp8_student_matches_the_eager_student_for_any_number_of_frames():
    from torch._dynamo.utils import counters

    student = make_student(make_teacher(frame_block=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deployed = deploy(student, "fp8", dynamic=True)  # one compile on CI: frames dynamic at once
    assert deployed.record.compiled
    for frames in (2, 3, 4):
        x = tokens(frames, seed=frames)
        with torch.no_grad():
            out = deployed(x)
        assert out.shape == (1, frames, TOKENS, 3)
        assert rel_err(out, _eager(student, x)) < 2e-2
    # one graph serves every number of frames, each computed right (checked above)
    assert counters["stats"]["unique_graphs"] == 1
    # activations far beyond the e4m3 range (448) saturate through the compiled quantization
    huge = tokens(4, seed=9) * 1e6
    with torch.no_grad():
        out = deployed(huge)
    assert torch.isfinite(out).all()
    assert rel_err(out, _eager(student, huge)) < 2e-2


def test_inductor_backend_keeps_the_trained_fake_quant_arithmetic():
    student = make_student(make_teacher(), backend="inductor")
    deployed = deploy(student, "inductor", compile=False)
    assert not deployed.record.float8_layers and not deployed.record.fp8_emulated
    assert any(isinstance(m, FP8FakeQuantLinear) for m in deployed.module.modules())
    x = tokens(2)
    with torch.no_grad():
        assert torch.equal(deployed(x), _eager(student, x))


def test_eval_router_builds_once_follows_weight_changes_and_respects_hooks():
    student = make_student(make_teacher())
    keys = sorted(student.state_dict())
    router = install_eval_backend(student, "fp8", compile=False)
    assert sorted(student.state_dict()) == keys  # the deployed form is not part of the student
    x = tokens(2)
    with torch.no_grad():
        out = student(x)
    assert router.builds == 1 and rel_err(out, _eager(student, x)) < 1e-5
    float8 = router.deployed.module.global_block.attn.qkv
    assert isinstance(float8, Float8Linear)

    # an optimizer step on proj_l (shared storage) and a new checkpoint for a float8 layer
    with torch.no_grad():
        student.global_block.attn.sla.proj_l.weight.add_(0.5)
    new_qkv = {k: torch.randn_like(v) for k, v in student.global_block.attn.qkv.state_dict().items()}
    student.global_block.attn.qkv.load_state_dict(new_qkv)
    with torch.no_grad():
        out = student(x)
    assert router.builds == 1, "in-place changes re-quantize, they do not rebuild"
    assert router.deployed.module.global_block.attn.qkv is float8
    assert rel_err(out, _eager(student, x)) < 1e-5

    # training mode runs the fake-quant student itself, with gradients
    student.train()
    y = student(x)
    assert y.requires_grad
    student.eval()

    # a forward hook must fire: the router runs the eager student and says so once
    seen = []
    handle = student.global_block.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    with pytest.warns(EagerForHooksWarning):
        with torch.no_grad():
            student(x)
    assert seen
    handle.remove()

    # a replaced tensor (here a swapped module) rebuilds the deployed form
    student.head = copy.deepcopy(student.head)
    with torch.no_grad():
        out = student(x)
    assert router.builds == 2 and rel_err(out, _eager(student, x)) < 1e-5

    # a copy of the student routes itself, with its own deployed form
    twin = copy.deepcopy(student)
    assert twin.forward.student is twin and twin.forward.deployed is None
    with torch.no_grad():
        assert rel_err(twin(x), out) < 1e-6


def test_cuda_graphs_without_a_gpu_are_refused_with_a_warning():
    student = make_student(make_teacher())
    with pytest.warns(UserWarning, match="cuda_graphs=True ignored"):
        deployed = deploy(student, "fp8", compile=False, cuda_graphs=True, warn_emulation=False)
    assert not deployed.record.cuda_graphs
    with pytest.raises(ValueError, match="backend must be one of"):
        deploy(student, "tensorrt")


@pytest.mark.gpu
def test_fp8_deploy_on_a_gpu_runs_real_fp8_gemms_with_cuda_graphs():
    student = make_student(make_teacher()).to("cuda", torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no emulation on a GPU of CC >= 8.9
        deployed = deploy(student, "fp8", cuda_graphs=True, dynamic=True)
    assert not deployed.record.fp8_emulated and deployed.record.cuda_graphs
    for frames in (2, 4):
        x = tokens(frames).to("cuda", torch.bfloat16)
        with torch.no_grad():
            out = deployed(x)
            assert rel_err(out, _eager(student, x)) < 2e-2

"""``lite()``: the student trains only proj_l, shares the teacher's storage, leaves the teacher
unchanged, keeps every state-dict key, and says clearly what it did and did not do."""

from __future__ import annotations

import os
import resource
import sys
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lite3r_compile.api import (
    FP8EmulationWarning,
    NoAttentionWarning,
    is_student,
    lite,
)
from lite3r_compile.capture import CaptureError
from lite3r_compile.config import FP8Config, LiteConfig
from lite3r_compile.passes.fp8_qat import FP8FakeQuantLinear
from lite3r_compile.reporting import report
from lite3r_compile.sla.config import SLAConfig
from lite3r_compile.sla.module import SparseLinearAttention

DIM, HEADS, TOKENS = 32, 2, 64
# 4 key blocks of 16 tokens, 2 critical: the linear branch (and proj_l's weight) takes part.
SMALL_BLOCKS = SLAConfig(topk=0.5, block_q=16, block_k=16)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.attn = Attention()
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Toy(nn.Module):
    """Tokens (B, N, 48) -> patch_embed -> 2 blocks -> head (B, N, 3); a BatchNorm whose running
    statistics move in training mode; a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Linear(48, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.bn = nn.BatchNorm1d(DIM)
        self.head = nn.Linear(DIM, 3)
        self.register_buffer("offset", torch.zeros(DIM), persistent=False)

    def forward(self, x):
        x = self.patch_embed(x) + self.offset
        for block in self.blocks:
            x = block(x)
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)
        return self.head(x)

    def example_inputs(self):
        return (torch.randn(2, TOKENS, 48, generator=torch.Generator().manual_seed(0)),)


def _teacher():
    torch.manual_seed(0)
    return Toy().eval()


def _lite(teacher, **kwargs):
    kwargs.setdefault("config", LiteConfig(sla=SMALL_BLOCKS))
    kwargs.setdefault("backend", "eager")
    return lite(teacher, **kwargs)


def _proj_l_names(n_blocks=2):
    return sorted(f"blocks.{i}.attn.sla.proj_l.{w}" for i in range(n_blocks) for w in ("weight", "bias"))


def test_only_proj_l_trains_and_backward_reaches_only_it():
    teacher = _teacher()
    student = _lite(teacher)
    assert sorted(n for n, p in student.named_parameters() if p.requires_grad) == _proj_l_names()
    student.train()
    (x,) = teacher.example_inputs()
    student(x).square().mean().backward()
    for name, p in student.named_parameters():
        if name in _proj_l_names():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name  # marginal blocks exist: even the weight moves
        else:
            assert p.grad is None, name
    assert all(p.grad is None for p in teacher.parameters())


def test_frozen_parameters_share_storage_and_the_teacher_is_unchanged():
    teacher = _teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    (x,) = teacher.example_inputs()
    with torch.no_grad():
        dense = teacher(x)
    student = _lite(teacher)
    teacher_params = dict(teacher.named_parameters())
    for name, p in student.named_parameters():
        if "proj_l" in name:
            continue
        t = teacher_params[name]
        assert p is not t and p.data_ptr() == t.data_ptr() and p.shape == t.shape, name
    # the teacher keeps its own Parameters, requires_grad, module types and modes
    assert all(p.requires_grad for p in teacher.parameters())
    assert not any(isinstance(m, (FP8FakeQuantLinear, SparseLinearAttention)) for m in teacher.modules())
    assert not is_student(teacher) and not teacher.training
    # a training step of the student, BatchNorm statistics included, leaves the teacher alone
    student.train()
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
    student(x).square().mean().backward()
    optimizer.step()
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(student.bn.running_mean, teacher.bn.running_mean)
    with torch.no_grad():
        assert torch.equal(teacher(x), dense)


def test_tied_parameters_stay_tied():
    teacher = _teacher()
    teacher.blocks[1].attn.proj.weight = teacher.blocks[0].attn.proj.weight
    student = _lite(teacher)
    assert student.blocks[1].attn.proj.weight is student.blocks[0].attn.proj.weight
    assert student.blocks[0].attn.proj.weight is not teacher.blocks[0].attn.proj.weight


def test_state_dict_keeps_every_teacher_key_and_round_trips():
    teacher = _teacher()
    student = _lite(teacher)
    teacher_sd, student_sd = teacher.state_dict(), student.state_dict()
    assert sorted(set(student_sd) - set(teacher_sd)) == _proj_l_names()
    assert set(teacher_sd) <= set(student_sd)
    for key, value in teacher_sd.items():
        assert torch.equal(student_sd[key], value), key
    missing, unexpected = student.load_state_dict(teacher_sd, strict=False)
    assert sorted(missing) == _proj_l_names() and unexpected == []
    # a trained student's state dict loads into a fresh student of the same teacher
    with torch.no_grad():
        for name, p in student.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p))
    other = _lite(_teacher())
    other.load_state_dict(student.state_dict())
    (x,) = teacher.example_inputs()
    with torch.no_grad():
        assert torch.equal(other(x), student(x))


def test_exact_student_reproduces_the_teacher():
    teacher = _teacher()
    exact = _lite(teacher, config=LiteConfig(sla=SLAConfig(topk=1.0, block_q=16, block_k=16),
                                             fp8=FP8Config(enabled=False)))
    assert len([m for m in exact.modules() if isinstance(m, SparseLinearAttention)]) == 2
    (x,) = teacher.example_inputs()
    with torch.no_grad():
        torch.testing.assert_close(exact(x), teacher(x), rtol=1e-5, atol=1e-5)


def test_default_student_fake_quantizes_block_linears_only():
    student = _lite(_teacher())
    fq = sorted(n for n, m in student.named_modules() if isinstance(m, FP8FakeQuantLinear))
    assert fq == sorted(f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2"))
    rep = report(student)
    assert len(rep.sla_sites) == 2 and len(rep.quantized_layers) == 8
    assert rep.trainable_params == 2 * (16 * 16 + 16) and rep.trainable_tensors == 4
    assert rep.frozen_params == sum(p.numel() for p in _teacher().parameters())
    reasons = {r.path: r.reason for r in rep.skipped_layers}
    assert "patch" in reasons["patch_embed"] and "not multiples of 16" in reasons["head"]
    assert "blocks.*.attn" in str(rep)
    # the record keeps plain site records, not the captured graphs
    record = student.lite3r_record.passes
    held = [s for r in record.results for v in r.artifacts.values() if isinstance(v, list) for s in v]
    held += record.artifacts["sites"] + record.artifacts["sla_sites"]
    assert all(getattr(s, "capture", None) is None for s in held)
    assert [r.name for r in record.results] == ["find_attention", "sla_rewrite", "fp8_qat", "freeze"]


def test_lite_on_a_student_is_an_error():
    student = _lite(_teacher())
    with pytest.raises(ValueError, match="already a lite3r student"):
        lite(student)
    wrapper = nn.Sequential(student.blocks[0])
    with pytest.raises(ValueError, match="holds a lite3r .* at '0"):
        lite(wrapper, example_inputs=(torch.randn(1, 8, DIM),))


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        lite(_teacher(), backend="tensorrt")
    with pytest.raises(TypeError, match="LiteConfig"):
        lite(_teacher(), config=SLAConfig())


def test_backend_warnings_are_said_once():
    teacher = _teacher()
    (x,) = teacher.example_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager = _lite(teacher, backend="eager")
        eager(x)
    assert caught == [] and eager.lite3r_backend == "eager"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inductor = _lite(teacher, backend="inductor")
        inductor.train()
        inductor(x)
        inductor.eval()
        inductor(x)
        inductor(x)
    # eval mode runs the deployed form (lowered, compiled on CUDA only), with nothing to say
    assert caught == [] and inductor.lite3r_backend == "inductor"
    assert inductor.forward.builds == 1

    # the teacher is on the CPU: no FP8 GEMMs there, with or without a GPU in the machine
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fp8 = _lite(teacher, backend="fp8")
        fp8(x)
    assert [w.category for w in caught] == [FP8EmulationWarning]
    assert "emulates FP8" in str(caught[0].message)
    assert fp8.lite3r_backend == "fp8" and report(fp8).fp8_emulated


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.body(x))


def test_model_without_attention_gives_a_working_fp8_only_student():
    torch.manual_seed(0)
    teacher = NoAttention()
    x = torch.randn(4, 16)
    with pytest.warns(NoAttentionWarning, match="FP8-only"):
        student = lite(teacher, backend="eager", example_inputs=(x,))
    assert isinstance(student.body[0], FP8FakeQuantLinear) and isinstance(student.body[2], FP8FakeQuantLinear)
    assert type(student.head) is nn.Linear
    assert not any(p.requires_grad for p in student.parameters())
    out = student(x)
    assert out.shape == (4, 5) and (out - teacher(x)).norm() < 0.1 * teacher(x).norm()
    rep = report(student)
    assert rep.sites == () and len(rep.quantized_layers) == 2 and rep.trainable_params == 0
    assert "(none found)" in str(rep) and "no parameter is trainable" in str(rep)


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 16), nn.Linear(8, 8))

    def forward(self, x):
        return self.encoder(x)


def test_model_failing_on_its_inputs_names_the_module():
    with pytest.raises(CaptureError, match=r"in module .encoder\.1. \(Linear\)"):
        lite(Broken(), backend="eager", example_inputs=(torch.randn(2, 16),))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _vggt_1b_with_cpu_weights():
    """VGGT-1B with real (materialised, float32) CPU weights: built on meta, then filled from a
    pool of random values (a full random init takes about a minute on 2 cores)."""
    from lite3r_compile import models_zoo

    model = models_zoo.create("vggt-1b", device="meta").to_empty(device="cpu").eval()
    pool = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02
    with torch.no_grad():
        for p in model.parameters():
            flat = p.view(-1)
            for start in range(0, flat.numel(), pool.numel()):
                chunk = flat[start:start + pool.numel()]
                chunk.copy_(pool[: chunk.numel()])
        tiny = models_zoo.create("vggt-tiny")
        for name, b in model.named_buffers():
            b.copy_(tiny.get_buffer(name))
    return model


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_vggt_1b_lite_is_fast_and_adds_little_memory():
    teacher = _vggt_1b_with_cpu_weights()
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    assert sum(p.numel() for p in teacher.parameters()) == 1_256_537_516
    rss_before, peak_before = _rss_bytes(), _peak_rss_bytes()
    images = torch.rand(1, 2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    student = lite(teacher, backend="eager", example_inputs=(images,))
    seconds = time.perf_counter() - start
    added = _rss_bytes() - rss_before
    peak_added = max(0, _peak_rss_bytes() - max(peak_before, rss_before))
    print(f"vggt-1b: lite {seconds:.1f} s, +{added / 2**20:.0f} MiB resident "
          f"(+{peak_added / 2**20:.0f} MiB peak) over a {teacher_bytes / 2**30:.2f} GiB teacher")
    assert seconds < 60
    assert added < 0.1 * teacher_bytes and peak_added < 0.1 * teacher_bytes
    teacher_params = dict(teacher.named_parameters())
    shared = [p.data_ptr() == teacher_params[n].data_ptr() for n, p in student.named_parameters() if "proj_l" not in n]
    assert len(shared) == len(teacher_params) and all(shared)
    rep = report(student)
    assert sorted(n for n, p in student.named_parameters() if p.requires_grad) == sorted(
        n for n in student.state_dict() if ".proj_l." in n
    )
    assert len(rep.sla_sites) > 0 and rep.trainable_params > 0


def test_variants_capture_once_and_match_separate_students(monkeypatch):
    from lite3r_compile.api import lite_variants
    from lite3r_compile.passes import attention

    teacher = _teacher()
    configs = [LiteConfig(sla=SMALL_BLOCKS), LiteConfig(sla=SLAConfig(topk=1.0, block_q=16, block_k=16),
                                                        fp8=FP8Config(enabled=False))]
    separate = [_lite(teacher, config=c) for c in configs]
    calls = []
    original = attention.locate_attention
    monkeypatch.setattr(attention, "locate_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    variants = lite_variants(teacher, configs, "eager")
    assert len(calls) == 1
    (x,) = teacher.example_inputs()
    with torch.no_grad():
        for one, other in zip(separate, variants):
            assert torch.equal(one(x), other(x))
    assert [r.name for r in variants[1].lite3r_record.passes.results][0] == "find_attention"
    assert variants[0].blocks[0].attn.qkv.weight is not variants[1].blocks[0].attn.qkv.weight

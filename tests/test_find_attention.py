"""find_attention: every spelling of every form, scopes, masks, distractors, zoo models."""

from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import given
from torch import nn

from lite3r_compile.capture import CaptureError
from lite3r_compile.passes.attention import AttentionSite, find_attention, locate_attention
from lite3r_compile.testing import SPELLINGS, architectures, one_site_model
from lite3r_compile.testing.distractors import MIXER_KINDS, ClassifierHead, build_mixer

ALL_SPELLINGS = [s for spellings in SPELLINGS.values() for s in spellings]
MHA_SPELLINGS = set(SPELLINGS["mha_module"] + SPELLINGS["mha_functional"])

# the generator's form -> the finder's form (manual forms are named by their product op)
EXPECTED_FORM = {
    "sdpa": "sdpa", "sdpa_scale": "sdpa", "sdpa_dropout": "sdpa", "sdpa_kernel_ctx": "sdpa",
    "sdpa_autocast": "sdpa", "scale_q": "matmul", "matmul_mul": "matmul", "div_sqrt": "matmul",
    "torch_matmul_mT": "matmul", "transpose23": "matmul", "softmax_fp32": "matmul", "bmm": "bmm",
    "einsum": "einsum", "baddbmm": "baddbmm", "xformers": "xformers",
    "mha_module": "multihead_attention", "mha_functional": "multihead_attention",
}


def _layouts(spelling: str) -> list[str]:
    return ["bhnd"] if spelling in MHA_SPELLINGS else ["bhnd", "bnhd"]


CASES = [(s, layout, scope) for s in ALL_SPELLINGS for layout in _layouts(s)
         for scope in ("frame", "global", "cross")]


@pytest.mark.parametrize("spelling,layout,scope", CASES)
def test_every_spelling_is_one_site(spelling, layout, scope):
    generated = one_site_model(spelling, scope=scope, layout=layout, custom_scale=spelling in (
        "sdpa_scale", "scale_q", "matmul_mul", "bmm", "einsum", "baddbmm"))
    truth = generated.sites[0]
    sites = find_attention(generated.model, generated.example_inputs)
    assert [(s.path, s.scope) for s in sites] == [(truth.path, truth.scope)]
    site = sites[0]
    assert site.form == EXPECTED_FORM[spelling]
    assert (site.num_heads, site.head_dim) == (truth.num_heads, truth.head_dim)
    assert site.rewritable and site.reason == "" and site.mask is None
    if site.scale is not None and site.form != "sdpa" or spelling == "sdpa_scale":
        assert site.scale == pytest.approx(truth.scale)
    if spelling == "xformers":
        assert site.layout == "bnhd"


@pytest.mark.parametrize("spelling", [s for s in ALL_SPELLINGS if s != "xformers"])
@pytest.mark.parametrize("mask_kind", ["additive", "bool"])
def test_masked_attention_stays_dense_with_reason(spelling, mask_kind):
    generated = one_site_model(spelling, scope="frame", mask_kind=mask_kind)
    (site,) = find_attention(generated.model, generated.example_inputs)
    assert not site.rewritable
    assert "attention mask" in site.reason and "not supported by SLA" in site.reason
    assert site.mask == ("boolean" if mask_kind == "bool" else "additive")


@pytest.mark.parametrize("kind", MIXER_KINDS)
def test_distractors_are_not_attention(kind):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mixer = build_mixer(kind, 16)
            self.head = ClassifierHead(16)

        def forward(self, x):
            y = self.mixer(x)
            return y, self.head(y[:, None])

    assert find_attention(Net(), (torch.randn(2, 5, 16),)) == []


class TwoScopes(nn.Module):
    """Frame attention on (B*S, P, C) and global attention on (B, S*P, C), same class."""

    def __init__(self) -> None:
        super().__init__()
        self.frame_attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.global_attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):  # (B, S, P, C)
        B, S, P, C = x.shape
        f = x.reshape(B * S, P, C)
        f = self.frame_attn(f, f, f, need_weights=False)[0]
        g = f.reshape(B, S * P, C)
        return self.global_attn(g, g, g, need_weights=False)[0]


def test_scope_from_sequence_lengths_not_names():
    sites = find_attention(TwoScopes(), (torch.randn(1, 3, 4, 16),))
    assert [(s.path, s.scope, s.q_len) for s in sites] == [("frame_attn", "frame", 4), ("global_attn", "global", 12)]
    single_view = find_attention(TwoScopes(), (torch.randn(1, 1, 4, 16),))
    assert [s.scope for s in single_view] == ["self", "self"]


def test_attention_weights_used_by_the_caller_stay_dense():
    class ReturnsWeights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            out, weights = self.attn(x, x, x)
            return out, weights

    (site,) = find_attention(ReturnsWeights(), (torch.randn(2, 5, 16),))
    assert not site.rewritable and "weights" in site.reason


def test_example_inputs_default_to_the_model_method_or_fail_clearly():
    generated = one_site_model("sdpa", scope="frame")
    model = generated.model
    with pytest.raises(ValueError, match="example inputs"):
        find_attention(model)
    model.example_inputs = lambda: generated.example_inputs
    assert len(find_attention(model)) == 1


def test_model_failing_on_example_inputs_names_the_module():
    generated = one_site_model("sdpa", scope="frame")
    bad = torch.randn(1, 2, 3, 5)  # wrong channel count for the token embedding
    with pytest.raises(CaptureError, match=r"module 'embed'"):
        find_attention(generated.model, (bad,))


def test_site_is_a_frozen_dataclass_with_the_public_fields():
    generated = one_site_model("einsum", scope="global", layout="bnhd")
    analysis = locate_attention(generated.model, generated.example_inputs)
    (site,) = analysis.sites
    assert isinstance(site, AttentionSite)
    with pytest.raises(AttributeError):
        site.path = "x"
    assert site.layout == "bnhd" and site.q_len == site.kv_len and site.sla_name == "sla"
    assert analysis.failures == [] and site.capture.module.path == site.path


@given(architectures(max_blocks=3))
def test_generated_architectures_sites_found_exactly_once(generated):
    analysis = locate_attention(generated.model, generated.example_inputs)
    found = sorted((s.path, s.scope) for s in analysis.sites)
    assert found == sorted((t.path, t.scope) for t in generated.sites), generated.description
    reported = {s.path for s in analysis.sites}
    for distractor in generated.distractor_paths:
        assert distractor not in reported
    for site in analysis.sites:
        truth = generated.site(site.path)
        assert site.rewritable == (not truth.has_mask), (site, generated.description)
        assert (site.num_heads, site.head_dim) == (truth.num_heads, truth.head_dim)


def _counts(sites):
    return collections.Counter((".".join(s.path.split(".")[:2]), s.scope, s.form) for s in sites)


def test_da3_tiny_backbone_and_camera_encoder_sites():
    from lite3r_compile import models_zoo

    model = models_zoo.create("da3-tiny").eval()
    sites = find_attention(model, model.example_inputs())
    counts = _counts(sites)
    blocks = model.backbone.pretrained.blocks
    alt_start = model.backbone.pretrained.alt_start
    # from alt_start on, odd blocks attend over all views, the others per view
    n_global = sum(1 for i in range(alt_start, len(blocks)) if i % 2 == 1)
    assert counts[("backbone.pretrained", "global", "sdpa")] == n_global > 0
    assert counts[("backbone.pretrained", "frame", "sdpa")] == len(blocks) - n_global
    assert sum(v for k, v in counts.items() if k[0] == "cam_enc.trunk") == len(model.cam_enc.trunk)
    assert all(s.rewritable for s in sites)


@pytest.mark.slow
def test_da3_large_has_24_backbone_and_4_camera_encoder_sites():
    # real CPU weights (1.6 GB): its camera encoder's data-dependent code cannot run on meta
    from lite3r_compile import models_zoo

    model = models_zoo.create("da3-large").eval()
    sites = find_attention(model)
    counts = _counts(sites)
    assert counts[("backbone.pretrained", "frame", "sdpa")] == 16  # blocks 0-7 and the even ones after
    assert counts[("backbone.pretrained", "global", "sdpa")] == 8  # odd blocks from 8 on
    assert sum(v for k, v in counts.items() if k[0] == "cam_enc.trunk") == 4
    assert len(sites) == 28 and all(s.rewritable for s in sites)


def test_dust3r_tiny_cross_attention_sites():
    from lite3r_compile import models_zoo

    model = models_zoo.create("dust3r-tiny").eval()
    sites = find_attention(model, model.example_inputs())
    cross = sorted(s.path for s in sites if s.scope == "cross")
    expected = sorted(f"{decoder}.{i}.cross_attn" for decoder in ("dec_blocks", "dec_blocks2")
                      for i in range(len(getattr(model, decoder))))
    assert cross == expected
    assert {s.scope for s in sites if s.path.endswith(".attn")} == {"frame"}
    assert all(s.rewritable for s in sites)


@pytest.mark.slow
def test_vggt_1b_on_meta_has_all_sites():
    from lite3r_compile import models_zoo

    model = models_zoo.create("vggt-1b", device="meta").eval()
    sites = find_attention(model, model.example_inputs())
    counts = _counts(sites)
    assert counts[("aggregator.patch_embed", "frame", "sdpa")] == 24
    assert counts[("aggregator.frame_blocks", "frame", "sdpa")] == 24
    assert counts[("aggregator.global_blocks", "global", "sdpa")] == 24
    assert counts[("camera_head.trunk", "self", "sdpa")] == 4
    mha = [m for m in model.track_head.modules() if isinstance(m, nn.MultiheadAttention)]
    assert sum(v for k, v in counts.items() if k[2] == "multihead_attention") == len(mha) > 0
    frame = next(s for s in sites if s.path == "aggregator.frame_blocks.0.attn")
    assert (frame.num_heads, frame.head_dim) == (16, 64)

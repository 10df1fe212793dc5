"""What a generated model knows about itself: its true attention sites and its distractors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

__all__ = ["TrueSite", "GeneratedModel", "relative_error", "assert_close_rel", "flatten_outputs"]

SCOPES = ("frame", "global", "cross", "self")
FORMS = ("sdpa", "manual_scale_q", "manual_scale_after", "xformers", "mha_module", "mha_functional")


@dataclass(frozen=True)
class TrueSite:
    """One dense attention computation of a generated model, as the finder should report it.

    Attributes:
        path: qualified name of the innermost module whose forward holds the attention
            computation (``blocks.0.attn``); for ``nn.MultiheadAttention`` it is that module.
        scope: ``"frame"`` (keys are the tokens of the query's own view: the module sees
            (B*S, P, C)), ``"global"`` (keys are the tokens of all views: (B, S*P, C)),
            ``"cross"`` (queries and keys/values come from different streams), ``"self"`` (the
            model has a single view, so frame and global cannot differ).
        form: one of ``FORMS`` (the numbered forms of the design: SDPA, manual with the scale
            folded into q, manual with the scale after the product, xformers, nn.MultiheadAttention,
            F.multi_head_attention_forward).
        spelling: the exact spelling inside the form (``"sdpa_kernel_ctx"``, ``"bmm"``, ...).
        has_mask: the attention takes an attention mask (SLA does not support masks: such a site
            is found but not rewritable).
        mask_kind: ``None``, ``"additive"`` or ``"bool"``.
        num_heads, head_dim: H and D of the attention.
        scale: the softmax scale the computation uses (D^-0.5 unless drawn otherwise).
        layout: ``"bhnd"`` or ``"bnhd"``: the layout q, k, v are produced in.
        qk_norm, rope: LayerNorm over the head dim on q and k; 1D rotary embedding on q and k.
        symbolic_traceable: ``torch.fx.symbolic_trace`` of the module at ``path`` succeeds (False
            when the module has Python control flow on shapes or data around the attention, or
            for ``nn.MultiheadAttention`` whose forward checks tensor properties).
        capture: the simplest capture of the module at ``path`` that works on the inputs it sees
            in the model: ``"symbolic_trace"``; ``"make_fx"`` (a branch on a shape, or
            ``nn.MultiheadAttention``: make_fx with real inputs specialises it); ``"dynamo"``
            (a branch on data or ``int(pos.max())``: symbolic_trace and make_fx both fail, Dynamo
            breaks the graph there and the attention lands whole in the graph after the break;
            for ``int(pos.max())`` a tracer that keeps the ``rope`` child as a leaf also works).
    """

    path: str
    scope: str
    form: str
    has_mask: bool
    num_heads: int
    head_dim: int
    spelling: str = ""
    mask_kind: Optional[str] = None
    scale: float = 0.0
    layout: str = "bhnd"
    qk_norm: bool = False
    rope: bool = False
    symbolic_traceable: bool = True
    capture: str = "symbolic_trace"


@dataclass
class GeneratedModel:
    """A generated model with its ground truth.

    Attributes:
        model: the nn.Module (float32, CPU, eval mode; dropout probabilities are all 0).
        example_inputs: positional inputs for ``model(*example_inputs)``.
        sites: every dense attention site, one per module path.
        distractor_paths: modules computing softmax or matmul chains that are not attention.
        untraceable_paths: the innermost modules whose own forward has Python control flow that
            ``torch.fx.symbolic_trace`` cannot follow (``""`` is the root model); their ancestors
            cannot be symbolically traced either, their other children can.
        description: one line per part, for failure messages.
        spec: the drawn architecture (an ``ArchitectureSpec``) the model was built from.
    """

    model: nn.Module
    example_inputs: tuple
    sites: list[TrueSite]
    distractor_paths: list[str]
    description: str
    untraceable_paths: list[str] = field(default_factory=list)
    spec: Any = None

    def site(self, path: str) -> TrueSite:
        for site in self.sites:
            if site.path == path:
                return site
        raise KeyError(f"no true attention site at {path!r}; sites: {[s.path for s in self.sites]}")

    def __repr__(self) -> str:  # hypothesis prints this for a failing example
        return f"GeneratedModel(\n{self.description}\n)"


def flatten_outputs(outputs: Any) -> list[torch.Tensor]:
    """The tensors of a model output (tensor, dict, list or tuple, nested), in a stable order;
    ``None`` entries (``nn.MultiheadAttention``'s weights with ``need_weights=False``) hold none."""
    if outputs is None:
        return []
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, Mapping):
        return [t for key in sorted(outputs) for t in flatten_outputs(outputs[key])]
    if isinstance(outputs, Sequence) and not isinstance(outputs, (str, bytes)):
        return [t for item in outputs for t in flatten_outputs(item)]
    raise TypeError(f"cannot compare model outputs of type {type(outputs).__name__}")


def relative_error(actual: Any, expected: Any) -> float:
    """max over output tensors of ||actual - expected|| / ||expected|| (norms in float64).

    A norm-wise error: element-wise relative errors blow up on outputs that are close to zero.
    An all-zero expected tensor compares by absolute norm.
    """
    actual_list, expected_list = flatten_outputs(actual), flatten_outputs(expected)
    if len(actual_list) != len(expected_list):
        raise ValueError(f"outputs differ in structure: {len(actual_list)} vs {len(expected_list)} tensors")
    worst = 0.0
    for a, e in zip(actual_list, expected_list):
        if a.shape != e.shape:
            raise ValueError(f"output shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}")
        diff = (a.detach().double() - e.detach().double()).norm().item()
        norm = e.detach().double().norm().item()
        worst = max(worst, diff / norm if norm > 0 else diff)
    return worst


def assert_close_rel(actual: Any, expected: Any, tol: float = 1e-5) -> None:
    """Raise AssertionError when ``relative_error(actual, expected) >= tol``."""
    error = relative_error(actual, expected)
    if not error < tol:
        raise AssertionError(f"relative error {error:.3e} is not below {tol:.1e}")

"""Attention modules spelled every way real 3D-transformer code spells them.

One :class:`AttentionSpec` says how a module computes attention (form, exact spelling, layout of
q/k/v, where q/k/v come from, qk-norm, RoPE, mask, scale, control flow around it);
:func:`build_attention` turns it into an ``nn.Module``. Each ``_attend_<spelling>`` method below is
written as model code writes it, because the finder is tested on those exact graphs.

Shapes: x is (B, N, C) with C = H * D; ``context`` (cross-attention keys/values) is (B, M, C);
``pos`` (RoPE positions) is an int64 (B, N) tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lite3r_compile.testing.ground_truth import FORMS
from lite3r_compile.testing.xformers_ops import memory_efficient_attention

__all__ = [
    "AttentionSpec",
    "SPELLINGS",
    "SCALE_SPELLINGS",
    "SELF_QKV_SOURCES",
    "CROSS_QKV_SOURCES",
    "ATTENTION_CONTROLS",
    "build_attention",
    "mha_mask",
    "attention_keep_mask",
    "additive_mask",
    "RotaryEmbedding1D",
    "SpelledAttention",
    "SpelledCrossAttention",
    "FunctionalMultiheadAttention",
    "FunctionalCrossMultiheadAttention",
]

# form -> the spellings of that form; the first spelling of each form is its plainest.
SPELLINGS: dict[str, tuple[str, ...]] = {
    "sdpa": ("sdpa", "sdpa_scale", "sdpa_dropout", "sdpa_kernel_ctx", "sdpa_autocast"),
    "manual_scale_q": ("scale_q",),
    "manual_scale_after": (
        "matmul_mul",
        "div_sqrt",
        "torch_matmul_mT",
        "transpose23",
        "softmax_fp32",
        "bmm",
        "einsum",
        "baddbmm",
    ),
    "xformers": ("xformers",),
    "mha_module": ("mha_module",),
    "mha_functional": ("mha_functional",),
}
assert tuple(SPELLINGS) == FORMS

# spellings whose code names the scale explicitly, so a scale other than D^-0.5 can be drawn
SCALE_SPELLINGS = frozenset(
    {"sdpa_scale", "scale_q", "matmul_mul", "torch_matmul_mT", "transpose23", "softmax_fp32", "bmm", "einsum", "baddbmm", "xformers"}
)
SELF_QKV_SOURCES = ("unbind", "index", "chunk", "separate")
CROSS_QKV_SOURCES = ("separate", "kv_packed")
# Python control flow inside the attention module, around the attention computation:
# a branch on a shape, a branch on data, and a RoPE table sized by int(pos.max()) (VGGT's RoPE).
ATTENTION_CONTROLS = ("shape_branch", "data_branch", "int_rope")
MHA_FORMS = ("mha_module", "mha_functional")


@dataclass(frozen=True)
class AttentionSpec:
    """How one attention module computes attention.

    Attributes:
        form: one of ``FORMS``; ``spelling`` one of ``SPELLINGS[form]``.
        num_heads: H.
        layout: ``"bhnd"`` or ``"bnhd"``: the layout q, k, v are produced in (each spelling then
            brings them to the layout its op needs, as model code does).
        qkv_source: self-attention ``"unbind"`` / ``"index"`` / ``"chunk"`` (one packed qkv
            Linear) or ``"separate"`` (three Linears); cross-attention ``"separate"`` or
            ``"kv_packed"`` (q Linear and one kv Linear); ``"in_proj"`` for the MHA forms.
        qk_norm: LayerNorm over the head dim on q and k.
        rope: 1D rotary embedding on q and k (self-attention only).
        mask_kind: None, ``"additive"`` or ``"bool"``.
        custom_scale: the scale is 0.75 * D^-0.5 instead of D^-0.5 (spellings in
            ``SCALE_SPELLINGS`` only).
        control: None or one of ``ATTENTION_CONTROLS``.
        cross: queries from x, keys and values from ``context``.
    """

    form: str = "sdpa"
    spelling: str = "sdpa"
    num_heads: int = 2
    layout: str = "bhnd"
    qkv_source: str = "unbind"
    qk_norm: bool = False
    rope: bool = False
    mask_kind: Optional[str] = None
    custom_scale: bool = False
    control: Optional[str] = None
    cross: bool = False

    def __post_init__(self) -> None:
        if self.form not in SPELLINGS or self.spelling not in SPELLINGS[self.form]:
            raise ValueError(f"spelling {self.spelling!r} is not one of form {self.form!r}: {SPELLINGS.get(self.form)}")
        if self.layout not in ("bhnd", "bnhd"):
            raise ValueError(f"layout must be 'bhnd' or 'bnhd', got {self.layout!r}")
        mha = self.form in MHA_FORMS
        sources = ("in_proj",) if mha else CROSS_QKV_SOURCES if self.cross else SELF_QKV_SOURCES
        if self.qkv_source not in sources:
            raise ValueError(f"qkv_source {self.qkv_source!r} is not valid here; choose from {sources}")
        if mha and (self.qk_norm or self.rope or self.control is not None):
            raise ValueError("the MHA forms project inside torch: no qk_norm, rope or control")
        if self.rope and self.cross:
            raise ValueError("rope is drawn for self-attention only")
        if self.mask_kind not in (None, "additive", "bool"):
            raise ValueError(f"mask_kind must be None, 'additive' or 'bool', got {self.mask_kind!r}")
        if self.spelling == "xformers" and self.mask_kind == "bool":
            raise ValueError("xformers takes additive float biases only")
        if self.custom_scale and self.spelling not in SCALE_SPELLINGS:
            raise ValueError(f"spelling {self.spelling!r} uses the default scale")
        if self.control is not None and self.control not in ATTENTION_CONTROLS:
            raise ValueError(f"control must be one of {ATTENTION_CONTROLS}, got {self.control!r}")
        if self.control == "int_rope" and not self.rope:
            raise ValueError("control 'int_rope' needs rope=True")

    def scale(self, head_dim: int) -> float:
        return (0.75 if self.custom_scale else 1.0) * head_dim**-0.5

    def capture(self) -> str:
        """The simplest capture that works on the module built from this spec (see
        ``TrueSite.capture``)."""
        if self.control in ("data_branch", "int_rope"):
            return "dynamo"
        if self.control == "shape_branch" or self.form == "mha_module":
            return "make_fx"
        return "symbolic_trace"

    def symbolic_traceable(self) -> bool:
        """Whether torch.fx.symbolic_trace can trace the module built from this spec."""
        return self.capture() == "symbolic_trace"


def attention_keep_mask(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """Boolean (Nq, Nk) mask, True where a query may attend a key.

    Irregular on purpose (not causal, not a padding pattern) and never empties a row: key 0 is
    always allowed.
    """
    rows = torch.arange(num_queries, device=device)[:, None]
    cols = torch.arange(num_keys, device=device)[None, :]
    return ((rows + cols) % 3 != 2) | (cols == 0)


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``keep``, -inf elsewhere."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))


class RotaryEmbedding1D(nn.Module):
    """Rotary position embedding over the head dim (rotate-half convention, base 100).

    ``int_max_table=True`` builds the angle table up to ``int(pos.max())`` first, as VGGT's RoPE
    does; that ``int()`` on data is what defeats symbolic tracing.
    """

    def __init__(self, head_dim: int, layout: str, base: float = 100.0, int_max_table: bool = False) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        self.layout = layout
        self.int_max_table = int_max_table
        self.register_buffer("inv_freq", base ** (-torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)

    def forward(self, t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """t: (B, H, N, D) or (B, N, H, D) per ``layout``; pos: int64 (B, N)."""
        if self.int_max_table:
            max_position = int(pos.max()) + 1
            table = torch.arange(max_position, device=pos.device)[:, None].float() * self.inv_freq
            angles = table[pos]
        else:
            angles = pos[..., None].float() * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)  # (B, N, D)
        cos, sin = angles.cos(), angles.sin()
        if self.layout == "bhnd":
            cos, sin = cos[:, None], sin[:, None]
        else:
            cos, sin = cos[:, :, None], sin[:, :, None]
        first, second = t.chunk(2, dim=-1)
        return t * cos + torch.cat((-second, first), dim=-1) * sin


class SpelledAttention(nn.Module):
    """Multi-head self-attention computed with one drawn spelling: ``forward(x, pos=None)``."""

    max_tokens = 4096

    def __init__(self, dim: int, spec: AttentionSpec) -> None:
        super().__init__()
        if spec.form in MHA_FORMS:
            raise ValueError(f"form {spec.form!r} is built by build_attention, not SpelledAttention")
        if dim % spec.num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {spec.num_heads}")
        self.spec = spec
        self.num_heads = spec.num_heads
        self.head_dim = dim // spec.num_heads
        self.scale = spec.scale(self.head_dim)
        self.layout = spec.layout
        self.qkv_source = spec.qkv_source
        self.mask_kind = spec.mask_kind
        self.control = spec.control
        self.spelling = spec.spelling
        if spec.qkv_source in ("unbind", "index", "chunk"):
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q_proj = nn.Linear(dim, dim)
            if spec.qkv_source == "kv_packed":
                self.kv_proj = nn.Linear(dim, 2 * dim)
            else:
                self.k_proj = nn.Linear(dim, dim)
                self.v_proj = nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if spec.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if spec.qk_norm else nn.Identity()
        self.rope = (
            RotaryEmbedding1D(self.head_dim, spec.layout, int_max_table=spec.control == "int_rope") if spec.rope else None
        )
        self.attn_drop_p = 0.0
        self.attn_drop = nn.Dropout(self.attn_drop_p)
        self.proj = nn.Linear(dim, dim)
        self.autocast_device = "cuda" if torch.cuda.is_available() else "cpu"

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._attention(x, x, pos)

    def _attention(self, x: torch.Tensor, context: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
        B, N, C = x.shape
        if self.control == "shape_branch":
            if N > self.max_tokens:
                raise ValueError(f"{N} tokens exceed the {self.max_tokens} this attention supports")
        if self.control == "data_branch":
            if not bool(torch.isfinite(x).all()):
                raise ValueError("non-finite activations entering attention")
        q, k, v = self._project(x, context)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q = self.rope(q, pos)
            k = self.rope(k, pos)
        out = getattr(self, f"_attend_{self.spelling}")(q, k, v)  # (B, N, C)
        return self.proj(out)

    # -- q, k, v in the drawn layout ---------------------------------------------------------

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, H, N, D) or (B, N, H, D) per the layout."""
        B, N, _ = t.shape
        t = t.reshape(B, N, self.num_heads, self.head_dim)
        return t.transpose(1, 2) if self.layout == "bhnd" else t

    def _project(self, x: torch.Tensor, context: torch.Tensor):
        B, N, C = x.shape
        H, D = self.num_heads, self.head_dim
        if self.qkv_source == "unbind":
            qkv = self.qkv(x).reshape(B, N, 3, H, D)
            if self.layout == "bhnd":
                q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            else:
                q, k, v = qkv.unbind(2)
        elif self.qkv_source == "index":
            qkv = self.qkv(x).reshape(B, N, 3, H, D)
            qkv = qkv.permute(2, 0, 3, 1, 4) if self.layout == "bhnd" else qkv.permute(2, 0, 1, 3, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        elif self.qkv_source == "chunk":
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            q, k, v = self._heads(q), self._heads(k), self._heads(v)
        elif self.qkv_source == "kv_packed":
            q = self._heads(self.q_proj(x))
            M = context.shape[1]
            kv = self.kv_proj(context).reshape(B, M, 2, H, D)
            if self.layout == "bhnd":
                k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
            else:
                k, v = kv.unbind(2)
        else:
            q = self._heads(self.q_proj(x))
            k = self._heads(self.k_proj(context))
            v = self._heads(self.v_proj(context))
        return q, k, v

    def _to_bhnd(self, q, k, v):
        if self.layout == "bnhd":
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return q, k, v

    def _mask(self, q: torch.Tensor, k: torch.Tensor):
        """None, a boolean keep-mask or an additive mask of shape (Nq, Nk); q, k in (B, H, N, D)."""
        if self.mask_kind is None:
            return None
        keep = attention_keep_mask(q.shape[2], k.shape[2], q.device)
        return keep if self.mask_kind == "bool" else additive_mask(keep, q.dtype)

    def _masked_logits(self, attn: torch.Tensor, mask) -> torch.Tensor:
        if mask is None:
            return attn
        if self.mask_kind == "bool":
            return attn.masked_fill(~mask, float("-inf"))
        return attn + mask

    @staticmethod
    def _merge(out: torch.Tensor) -> torch.Tensor:
        """(B, H, N, D) -> (B, N, H * D)."""
        B, H, N, D = out.shape
        return out.transpose(1, 2).reshape(B, N, H * D)

    # -- form 1: F.scaled_dot_product_attention --------------------------------------------------

    def _attend_sdpa(self, q, k, v):
        q, k, v = self._to_bhnd(q, k, v)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(q, k))
        return self._merge(x)

    def _attend_sdpa_scale(self, q, k, v):
        q, k, v = self._to_bhnd(q, k, v)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(q, k), scale=self.scale)
        return self._merge(x)

    def _attend_sdpa_dropout(self, q, k, v):
        q, k, v = self._to_bhnd(q, k, v)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=self._mask(q, k), dropout_p=self.attn_drop_p if self.training else 0.0
        )
        return self._merge(x)

    def _attend_sdpa_kernel_ctx(self, q, k, v):
        q, k, v = self._to_bhnd(q, k, v)
        mask = self._mask(q, k)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self._merge(x)

    def _attend_sdpa_autocast(self, q, k, v):
        q, k, v = self._to_bhnd(q, k, v)
        mask = self._mask(q, k)
        with torch.autocast(device_type=self.autocast_device, enabled=False):
            x = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        return self._merge(x.to(q.dtype))

    # -- form 2: manual, scale folded into q -----------------------------------------------------

    def _attend_scale_q(self, q, k, v):
        q, k, v = self._to_bhnd(q, k, v)
        mask = self._mask(q, k)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = self._masked_logits(attn, mask)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v
        return self._merge(x)

    # -- form 3: manual, scale after the product -------------------------------------------------

    def _attend_matmul_mul(self, q, k, v):
        q, k, v = self._to_bhnd(q, k, v)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self._masked_logits(attn, self._mask(q, k))
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        return self._merge(attn @ v)

    def _attend_div_sqrt(self, q, k, v):
        q, k, v = self._to_bhnd(q, k, v)
        attn = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        attn = self._masked_logits(attn, self._mask(q, k))
        attn = F.softmax(attn, dim=-1)
        return self._merge(torch.matmul(attn, v))

    def _attend_torch_matmul_mT(self, q, k, v):
        q, k, v = self._to_bhnd(q, k, v)
        attn = torch.matmul(q, k.mT) * self.scale
        attn = self._masked_logits(attn, self._mask(q, k))
        attn = torch.softmax(attn, dim=-1)
        return self._merge(torch.matmul(attn, v))

    def _attend_transpose23(self, q, k, v):
        q, k, v = self._to_bhnd(q, k, v)
        attn = (q @ k.transpose(2, 3)) * self.scale
        attn = self._masked_logits(attn, self._mask(q, k))
        attn = attn.softmax(-1)
        return self._merge(attn @ v)

    def _attend_softmax_fp32(self, q, k, v):
        q, k, v = self._to_bhnd(q, k, v)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self._masked_logits(attn, self._mask(q, k))
        attn = torch.softmax(attn, dim=-1, dtype=torch.float32).to(q.dtype)
        return self._merge(attn @ v)

    def _attend_bmm(self, q, k, v):
        q, k, v = self._to_bhnd(q, k, v)
        mask = self._mask(q, k)
        B, H, N, D = q.shape
        M = k.shape[2]
        q = q.reshape(B * H, N, D)
        k = k.reshape(B * H, M, D)
        v = v.reshape(B * H, M, D)
        attn = torch.bmm(q, k.transpose(1, 2)) * self.scale
        attn = self._masked_logits(attn, mask)
        attn = attn.softmax(dim=-1)
        x = torch.bmm(attn, v).reshape(B, H, N, D)
        return self._merge(x)

    def _attend_einsum(self, q, k, v):
        mask = None
        if self.layout == "bhnd":
            attn = torch.einsum("bhnd,bhmd->bhnm", q, k) * self.scale
            if self.mask_kind is not None:
                mask = self._mask(q, k)
        else:
            attn = torch.einsum("bnhd,bmhd->bhnm", q, k) * self.scale
            if self.mask_kind is not None:
                mask = self._mask(q.transpose(1, 2), k.transpose(1, 2))
        attn = self._masked_logits(attn, mask)
        attn = attn.softmax(dim=-1)
        if self.layout == "bhnd":
            return self._merge(torch.einsum("bhnm,bhmd->bhnd", attn, v))
        x = torch.einsum("bhnm,bmhd->bnhd", attn, v)
        B, N, H, D = x.shape
        return x.reshape(B, N, H * D)

    def _attend_baddbmm(self, q, k, v):
        q, k, v = self._to_bhnd(q, k, v)
        mask = self._mask(q, k)
        B, H, N, D = q.shape
        M = k.shape[2]
        q = q.reshape(B * H, N, D)
        k = k.reshape(B * H, M, D)
        v = v.reshape(B * H, M, D)
        if self.mask_kind == "additive":
            attn = torch.baddbmm(mask.expand(B * H, N, M), q, k.transpose(1, 2), beta=1.0, alpha=self.scale)
        else:
            bias = torch.zeros(B * H, N, M, dtype=q.dtype, device=q.device)
            attn = torch.baddbmm(bias, q, k.transpose(1, 2), beta=0.0, alpha=self.scale)
            if self.mask_kind == "bool":
                attn = attn.masked_fill(~mask, float("-inf"))
        attn = attn.softmax(dim=-1)
        x = torch.bmm(attn, v).reshape(B, H, N, D)
        return self._merge(x)

    # -- form 4: xformers in (B, N, H, D) --------------------------------------------------------

    def _attend_xformers(self, q, k, v):
        if self.layout == "bhnd":
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        B, N, H, D = q.shape
        M = k.shape[1]
        attn_bias = None
        if self.mask_kind == "additive":
            keep = attention_keep_mask(N, M, q.device)
            attn_bias = additive_mask(keep, q.dtype).expand(B, H, N, M)
        if self.spec.custom_scale:
            x = memory_efficient_attention(q, k, v, attn_bias=attn_bias, scale=self.scale)
        else:
            x = memory_efficient_attention(q, k, v, attn_bias)
        return x.reshape(B, N, H * D)


class SpelledCrossAttention(SpelledAttention):
    """Queries from x (B, N, C), keys and values from context (B, M, C): ``forward(x, context)``."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self._attention(x, context, None)


class FunctionalMultiheadAttention(nn.Module):
    """Form 5b: ``F.multi_head_attention_forward`` with a packed in-projection, batch-first I/O:
    ``forward(x, pos=None)`` (``pos`` is accepted like the other attention modules and unused)."""

    def __init__(self, dim: int, spec: AttentionSpec) -> None:
        super().__init__()
        if dim % spec.num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {spec.num_heads}")
        self.spec = spec
        self.embed_dim = dim
        self.num_heads = spec.num_heads
        self.mask_kind = spec.mask_kind
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.normal_(self.in_proj_bias, std=0.02)

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._attention(x, x)

    def _attention(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        query = x.transpose(0, 1)  # (N, B, C): the functional form is sequence-first
        key = kv.transpose(0, 1)
        attn_mask = None
        if self.mask_kind is not None:
            keep = attention_keep_mask(query.shape[0], key.shape[0], x.device)
            # torch's boolean attention masks mark the positions that may NOT attend
            attn_mask = ~keep if self.mask_kind == "bool" else additive_mask(keep, x.dtype)
        out, _ = F.multi_head_attention_forward(
            query,
            key,
            key,
            self.embed_dim,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            None,
            None,
            False,
            0.0,
            self.out_proj.weight,
            self.out_proj.bias,
            training=self.training,
            need_weights=False,
            attn_mask=attn_mask,
        )
        return out.transpose(0, 1)


class FunctionalCrossMultiheadAttention(FunctionalMultiheadAttention):
    """``F.multi_head_attention_forward`` cross-attention: ``forward(x, context)``."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self._attention(x, context)


def build_attention(dim: int, spec: AttentionSpec) -> nn.Module:
    """The module for ``spec``. The ``mha_module`` form is a plain ``nn.MultiheadAttention``
    (batch_first); its caller passes query, key, value and the mask (see ``mha_mask``)."""
    if spec.form == "mha_module":
        if dim % spec.num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {spec.num_heads}")
        mha = nn.MultiheadAttention(dim, spec.num_heads, batch_first=True)
        nn.init.normal_(mha.in_proj_bias, std=0.02)
        return mha
    if spec.form == "mha_functional":
        return (FunctionalCrossMultiheadAttention if spec.cross else FunctionalMultiheadAttention)(dim, spec)
    return (SpelledCrossAttention if spec.cross else SpelledAttention)(dim, spec)


def mha_mask(mask_kind: Optional[str], num_queries: int, num_keys: int, like: torch.Tensor):
    """The ``attn_mask`` argument of ``nn.MultiheadAttention`` for ``attention_keep_mask``."""
    if mask_kind is None:
        return None
    keep = attention_keep_mask(num_queries, num_keys, like.device)
    return ~keep if mask_kind == "bool" else additive_mask(keep, like.dtype)

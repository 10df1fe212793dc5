"""Sparse Linear Attention: the PyTorch reference (the specification), the ``lite3r::sla_forward``
op with its Triton kernels, and the ``SparseLinearAttention`` module."""

from lite3r_compile.sla.config import SLAConfig
from lite3r_compile.sla.module import SparseLinearAttention
from lite3r_compile.sla.op import sla_attention

__all__ = ["SLAConfig", "SparseLinearAttention", "sla_attention"]

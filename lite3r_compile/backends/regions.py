"""Regional compilation: ``torch.compile`` each repeated block of a model, not the whole model.

A 3D-reconstruction transformer is mostly one block class repeated (VGGT-1B: 24 DINOv2 blocks,
24 frame and 24 global aggregator blocks, the camera head's trunk). Compiled whole, Dynamo traces
and Inductor compiles every block again, inlined into one graph: 166-185 s a variant for VGGT-1B
on an H200 (``benchmarks/NOTES.md``). Compiled block by block, the blocks of one class running on
one shape share a single graph, because Dynamo inlines ``nn.Module`` calls and takes their
parameters as graph inputs (``torch._dynamo.config.inline_inbuilt_nn_modules``): each
(class, shape) compiles once: a VGGT-1B variant's first call takes 22-30 s, SLA autotuning
included. The model's heads (:func:`~lite3r_compile.backends.head_precision.find_heads`) are
regions too: a DPT head at 518x518 is a chain of convolutions, bilinear upsamplings and adds over
full-resolution maps, a third of a VGGT-1B student's GPU time at S=32 when run eagerly, and
Inductor fuses the upsampling into the add that consumes it. What lies between the regions (patch
embedding, token bookkeeping, a head's eager loop around its compiled trunk) runs eagerly; with
CUDA graphs the regions replay as graphs and only that part launches kernels.

The attention sites a lite student rewrote are ``torch.fx.GraphModule`` s, and FX gives every
GraphModule a class of its own (its generated ``forward`` lives on the class), which Dynamo
guards on: blocks that hold them would each compile again. Before compiling, the GraphModules
inside the blocks whose generated code is the same share one class
(:func:`share_graph_module_classes`); their code is that class's ``forward`` either way.

A *repeated block* is an item of an ``nn.ModuleList`` or ``nn.Sequential`` whose items, two or
more, are all of one class that has submodules of its own and a forward of its own (a block, not
a layer or a stack of layers: neither a list of ``Conv2d`` nor a list of ``nn.Sequential`` is
one). Only the outermost such lists count: a block inside a repeated block is compiled with it.
A *head region* is a head that has submodules, holds no repeated block (a
camera head's trunk is compiled as blocks instead) and sits in none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from torch import fx, nn


@dataclass(frozen=True)
class BlockGroup:
    """One list of repeated blocks: its module ``path``, the block ``class_name`` and ``count``."""

    path: str
    class_name: str
    count: int


def repeated_blocks(module: nn.Module) -> list[tuple[BlockGroup, list[nn.Module]]]:
    """Every outermost list of repeated blocks in ``module`` (see the module docstring), in
    module order, with its blocks."""
    found: list[tuple[BlockGroup, list[nn.Module]]] = []

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, (nn.ModuleList, nn.Sequential)):
                items = list(child.children())
                classes = {type(item) for item in items}
                block = items[0] if len(items) >= 2 and len(classes) == 1 else None
                if block is not None and not isinstance(block, nn.Sequential) and next(block.children(), None) is not None:
                    found.append((BlockGroup(path, type(items[0]).__name__, len(items)), items))
                    continue
            walk(child, path)

    walk(module, "")
    return found


def head_regions(module: nn.Module, groups: list[BlockGroup]) -> list[tuple[BlockGroup, nn.Module]]:
    """The heads of ``module`` compiled as regions of their own, given its repeated-block
    ``groups`` (see the module docstring), each as a group of one."""
    from lite3r_compile.backends.head_precision import find_heads

    def overlaps(path: str) -> bool:
        return any(g.path.startswith(path + ".") or path.startswith(g.path + ".") for g in groups)

    found = []
    for path in find_heads(module):
        head = module.get_submodule(path)
        if next(head.children(), None) is not None and not overlaps(path):
            found.append((BlockGroup(path, type(head).__name__, 1), head))
    return found


def share_graph_module_classes(modules: Iterable[nn.Module]) -> int:
    """Give the ``fx.GraphModule`` s in ``modules`` (and their submodules) whose generated code
    and base class are the same one class, the first one's; returns how many changed class.

    Safe for GraphModules that are not recompiled afterwards: a GraphModule's class holds only
    its generated ``forward`` and the call wrapper around it, and the code, which names the
    submodules and attributes it reads from ``self``, is equal by construction.
    """
    shared: dict[tuple[type, str], type] = {}
    changed = 0
    for root in modules:
        for m in root.modules():
            if not isinstance(m, fx.GraphModule):
                continue
            base = type(m).__mro__[1]  # FX's per-instance class derives from the real one
            cls = shared.setdefault((base, m.code), type(m))
            if type(m) is not cls:
                m.__class__ = cls
                changed += 1
    return changed


def compile_blocks(module: nn.Module, *, heads: bool = True, **compile_options: Any) -> list[BlockGroup]:
    """Compile every repeated block of ``module`` in place (``nn.Module.compile`` with
    ``compile_options``, e.g. ``backend`` and ``dynamic``), and with ``heads`` its head regions,
    and return the groups compiled (a head region is a group of one).

    Raises ``ValueError`` for a module with no repeated block: regional compilation would compile
    nothing, and the caller should compile the whole module instead.
    """
    groups = repeated_blocks(module)
    if not groups:
        raise ValueError(
            f"regional compilation: {type(module).__name__} has no repeated blocks (an nn.ModuleList "
            "or nn.Sequential of two or more modules of one class); compile the whole module "
            "instead (LiteConfig(regional_compile=False))"
        )
    regions = [(group, blocks) for group, blocks in groups]
    if heads:
        regions += [(group, [head]) for group, head in head_regions(module, [g for g, _ in groups])]
    share_graph_module_classes(block for _, blocks in regions for block in blocks)
    for _, blocks in regions:
        for block in blocks:
            block.compile(**compile_options)
    return [group for group, _ in regions]


__all__ = ["BlockGroup", "compile_blocks", "head_regions", "repeated_blocks", "share_graph_module_classes"]

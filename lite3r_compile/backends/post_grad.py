"""Inductor post-grad passes that chain onto the one already configured.

``torch._inductor.config.post_grad_custom_pre_pass`` holds a single pass. The ``lite3r`` backend
adds several and must not drop one a user set, so each of its passes runs the passes it was
given as ``after`` first, then its own. Inductor keys its FX-graph cache on the pass's
:meth:`uuid`; a chain is keyed on every member, and a member Inductor cannot key (a plain
function) makes the chain uncacheable rather than wrongly cached.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files


class ChainedGraphPass(CustomGraphPass):
    """A post-grad pass that runs ``after`` (a pass, a list of passes or None) before its own
    :meth:`run`. ``source`` (the subclass's file) and ``key`` (its configuration) make the uuid."""

    def __init__(self, after: Any, *, source: str, key: str) -> None:
        self.after = [] if after is None else list(after) if isinstance(after, (list, tuple)) else [after]
        self._source = source
        self._key = key

    def run(self, graph: fx.Graph) -> None:
        raise NotImplementedError

    def __call__(self, graph: fx.Graph) -> None:
        for earlier in self.after:
            earlier(graph)
        self.run(graph)

    def uuid(self) -> bytes | None:
        earlier = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.after]
        if any(u is None for u in earlier):
            return None
        return get_hash_for_files((self._source, __file__), self._key + repr(earlier))


__all__ = ["ChainedGraphPass"]

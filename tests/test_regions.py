"""Regional compilation: each repeated block compiled once per class and shape, the rest eager."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from lite3r_compile.api import lite
from lite3r_compile.backends.deploy import deploy
from lite3r_compile.backends.regions import compile_blocks, repeated_blocks
from lite3r_compile.backends.serialization import load_deployable, save_deployable
from lite3r_compile.config import LiteConfig
from lite3r_compile.sla.config import SLAConfig
from test_backend_deploy import DIM, TOKENS, Block, _fresh_dynamo, tokens  # noqa: F401 (the fixture is autouse)


def block() -> nn.Module:
    """A pre-norm transformer block with SDPA attention (the deploy tests' ``Block``)."""
    return Block(manual=False)


class Stage(nn.Module):
    """A block that holds a list of blocks of its own: compiled whole, as one region."""

    def __init__(self):
        super().__init__()
        self.inner = nn.ModuleList([block(), block()])

    def forward(self, x):
        for block in self.inner:
            x = block(x)
        return x


class Alternating(nn.Module):
    """Tokens (B, S, P, C): 3 frame blocks over (B*S, P), 2 global blocks over (B, S*P), a list
    of leaf layers (not blocks), a list of two classes (not repeated), two stages, a head."""

    def __init__(self):
        super().__init__()
        self.frame_blocks = nn.ModuleList([block() for _ in range(3)])
        self.global_blocks = nn.ModuleList([block() for _ in range(2)])
        self.projects = nn.ModuleList([nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)])
        self.mixed = nn.ModuleList([block(), nn.Sequential(nn.Linear(DIM, DIM), nn.GELU())])
        self.stages = nn.Sequential(Stage(), Stage())
        self.head = nn.Linear(DIM, 3)

    def forward(self, tokens):
        b, s, p, c = tokens.shape
        x = tokens.reshape(b * s, p, c)
        for block in self.frame_blocks:
            x = block(x)
        x = x.reshape(b, s * p, c)
        for block in self.global_blocks:
            x = block(x)
        for layer in self.projects:
            x = x + layer(x)
        x = self.mixed[1](self.mixed[0](x))
        return self.head(self.stages(x)).reshape(b, s, p, 3)

    def example_inputs(self):
        return (torch.randn(1, 2, TOKENS, DIM, generator=torch.Generator().manual_seed(0)),)


def make_model() -> Alternating:
    torch.manual_seed(0)
    return Alternating().eval()




def test_repeated_blocks_are_the_outermost_lists_of_one_block_class():
    groups = repeated_blocks(make_model())
    assert [(g.path, g.class_name, g.count) for g, _ in groups] == [
        ("frame_blocks", "Block", 3), ("global_blocks", "Block", 2), ("stages", "Stage", 2),
    ]
    model = make_model()
    assert [len(blocks) for _, blocks in repeated_blocks(model)] == [3, 2, 2]
    assert repeated_blocks(model)[0][1][0] is model.frame_blocks[0]


def test_blocks_of_one_class_and_shape_share_one_graph_and_compute_what_eager_does():
    from torch._dynamo.utils import counters

    model = make_model()
    x = tokens(2)
    with torch.no_grad():
        expected = model(x)
        groups = compile_blocks(model, backend="aot_eager", dynamic=False)
        assert [g.path for g in groups] == ["frame_blocks", "global_blocks", "stages"]
        out = model(x)
        again = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    # Block on (2, 32) tokens, Block on (1, 64), Stage on (1, 64): three graphs for seven blocks,
    # none recompiled on the second call
    assert counters["stats"]["unique_graphs"] == 3
    assert counters["frames"]["ok"] == 3


class CameraHead(nn.Module):
    """A head that runs its trunk of blocks in a loop of its own: its blocks are the region."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(block(), block())
        self.out = nn.Linear(DIM, 9)

    def forward(self, x):
        for _ in range(2):
            x = self.trunk(x)
        return self.out(x)


class DepthHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, 1)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class WithHeads(nn.Module):
    """Two blocks, a list of layer stacks (not blocks), a dense head and a camera head."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([block(), block()])
        self.stacks = nn.ModuleList([nn.Sequential(nn.Linear(DIM, DIM), nn.GELU()) for _ in range(2)])
        self.depth_head = DepthHead()
        self.camera_head = CameraHead()

    def forward(self, x):
        for layer in (*self.blocks, *self.stacks):
            x = layer(x)
        return self.depth_head(x), self.camera_head(x)


def test_heads_are_regions_unless_they_hold_repeated_blocks():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = WithHeads().eval()
    x = torch.randn(2, TOKENS, DIM)
    with torch.no_grad():
        expected = model(x)
        groups = compile_blocks(model, backend="aot_eager", dynamic=False)
        out = model(x)
    assert [(g.path, g.class_name, g.count) for g in groups] == [
        ("blocks", "Block", 2), ("camera_head.trunk", "Block", 2), ("depth_head", "DepthHead", 1),
    ]
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-6)
    # the blocks and the camera trunk's blocks share one graph (one class, one shape), the head has its own
    assert counters["stats"]["unique_graphs"] == 2
    assert [g.path for g in compile_blocks(WithHeads(), heads=False, backend="aot_eager")] == [
        "blocks", "camera_head.trunk",
    ]


def test_a_model_without_repeated_blocks_is_an_error():
    with pytest.raises(ValueError, match="Linear has no repeated blocks.*regional_compile=False"):
        compile_blocks(nn.Linear(4, 4))


def test_a_regional_student_compiles_its_blocks_and_round_trips(tmp_path):
    from torch._dynamo.utils import counters

    teacher = make_model()
    config = LiteConfig(sla=SLAConfig(topk=0.5, block_q=16, block_k=16), regional_compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = lite(teacher, backend="fp8", config=config).eval()
        deployed = deploy(student, "fp8", compile=True)
    assert deployed.record.compiled_blocks == [
        "frame_blocks: 3 x Block", "global_blocks: 2 x Block", "stages: 2 x Stage",
    ]
    assert deployed.record.float8_layers  # FP8 layers inside and outside the compiled blocks
    x = tokens(2)
    with torch.no_grad():
        out = deployed(x)
        eager = type(student).forward(student, x)
    assert ((out - eager).norm() / eager.norm()).item() < 2e-2
    # Each rewritten attention is a GraphModule of its own class; with the classes shared, the 7
    # blocks compile 4 graphs on torch 2.13 (frame and global Block, the global Block again
    # because the first one's input is a view, Stage), not 7. The same call again compiles none.
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 5
    with torch.no_grad():
        deployed(x)
        assert counters["stats"]["unique_graphs"] == graphs
        deployed(tokens(3))  # a second frame count makes the frame dims dynamic
        graphs = counters["stats"]["unique_graphs"]
        bigger = deployed(tokens(4))  # and the third compiles nothing
        eager4 = type(student).forward(student, tokens(4))
    assert counters["stats"]["unique_graphs"] == graphs
    assert ((bigger - eager4).norm() / eager4.norm()).item() < 2e-2

    path = tmp_path / "student.safetensors"
    save_deployable(student, path)
    loaded = load_deployable(path, model=make_model(), compile=True)
    assert loaded.record.compiled_blocks == deployed.record.compiled_blocks
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model", ["alternating", "with_heads"])
def test_regional_blocks_replay_as_cuda_graphs_call_after_call(model):
    # with_heads: the model's outputs come out of a compiled head's graph
    torch.manual_seed(0)
    teacher = (make_model() if model == "alternating" else WithHeads().eval()).cuda()
    config = LiteConfig(sla=SLAConfig(topk=0.5, block_q=16, block_k=16), regional_compile=True)
    x = tokens(2).cuda() if model == "alternating" else torch.randn(2, TOKENS, DIM, device="cuda")
    example = (x,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = lite(teacher, backend="fp8", config=config, example_inputs=example).eval()
        graphed = lite(teacher, backend="fp8", config=dataclasses.replace(config, cuda_graphs=True),
                       example_inputs=example).eval()
    with torch.no_grad():
        expected = student(x)  # the same regional blocks, launched kernel by kernel
        outs = [graphed(x) for _ in range(4)]  # warm-up, recording, then replays
    record = graphed.forward.deployed.record
    assert record.cuda_graphs and record.compiled_blocks
    # each call's output stays valid after the next calls (copied out of the graphs' memory)
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)

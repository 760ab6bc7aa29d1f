"""Capture by repetition (vcyclefx.capture.repeat): two periods of identical blocks traced, then
repeated to the model's block count, give the graph a whole trace gives (the same ops, arguments
and module paths, node for node), the model's tensors in its own order, and bit-equal outputs at
other input sizes; blocks that differ are captured whole; the coalesce command writes exactly
what `--whole-capture` writes, streamed or in memory."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import fx

from vcyclefx.capture.frontend import capture
from vcyclefx.capture.recipe import recipe_of
from vcyclefx.capture.repeat import (REPEATED, _reads_count, block_signature,
                                     captured_by_repetition, repeated_capture)
from vcyclefx.cli import main
from vcyclefx.export.leveldir import load_level

transformers.logging.set_verbosity_error()

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=96)
FAMILIES = {
    "gpt2": lambda n: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=n, n_embd=32, n_head=4, vocab_size=96, n_positions=64)),
    "llama": lambda n: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=n, **SMALL)),
    # a period of 2 (sliding-window and global layers alternate)
    "gemma2": lambda n: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        num_hidden_layers=n, head_dim=8, sliding_window=4, **SMALL)),
    # post-norm encoder
    "bert": lambda n: transformers.BertForMaskedLM(transformers.BertConfig(
        num_hidden_layers=n, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        vocab_size=96)),
    "mixtral": lambda n: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        num_hidden_layers=n, num_local_experts=4, num_experts_per_tok=2, **SMALL)),
}


def _model(family: str, n: int):
    torch.manual_seed(0)
    m = FAMILIES[family](n)
    m.config.use_cache = False
    return m.eval()


def _build(family: str):
    cls = type(FAMILIES[family](1))

    def build(cfg):
        return cls(cfg).eval()

    return build


def _canonical(gm) -> list[tuple]:
    """Each node as (op, target, arguments with nodes as positions, module path of tensor ops);
    the module path of symbolic-size arithmetic is left out (export reuses such a node's
    metadata across blocks)."""
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    out = []
    for n in gm.graph.nodes:
        args = fx.node.map_arg((n.args, n.kwargs), lambda a: f"#{pos[a]}")
        stack = [p for p, _ in (n.meta.get("nn_module_stack") or {}).values()] \
            if isinstance(n.meta.get("val"), torch.Tensor) else None
        out.append((n.op, str(n.target), repr(args), stack))
    return out


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("family", ["llama", "gemma2", "bert", pytest.param("gpt2", marks=pytest.mark.slow),
                                    pytest.param("mixtral", marks=pytest.mark.slow)])
def test_repeated_blocks_give_the_graph_of_a_whole_trace(family):
    n = 6
    model = _model(family, n)
    x = torch.randint(0, 96, (2, 16))
    whole = capture(model, (x,))
    # the smaller model built on the meta device, as the command line does
    rep = captured_by_repetition(model, (x,), recipe_of(model))
    assert rep is not None
    assert any(REPEATED in note for note in rep.info.notes)
    assert list(rep.state_dict()) == list(whole.state_dict())  # the model's own order
    params = dict(rep.named_parameters(remove_duplicate=False))
    for name, t in model.named_parameters(remove_duplicate=False):  # the model's own tensors
        assert params[name] is t, name
    assert _canonical(rep) == _canonical(whole)
    other = torch.randint(0, 96, (3, 11))  # the symbolic sizes still are symbolic
    assert torch.equal(_logits(rep.eval()(other)), _logits(whole.eval()(other)))
    assert rep.info.recipe == whole.info.recipe


def test_blocks_that_differ_are_captured_whole():
    # a dense layer among sparse ones: the blocks are not all alike
    cfg = transformers.Qwen2MoeConfig(num_hidden_layers=6, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=32, num_experts=4,
                                      num_experts_per_tok=2, mlp_only_layers=[1], **SMALL)
    model = transformers.Qwen2MoeForCausalLM(cfg).eval()
    sigs = [block_signature(b) for b in model.model.layers]
    assert sigs[1] != sigs[0] and sigs[2] == sigs[0]
    called = []
    assert repeated_capture(model, lambda c: called.append(c), lambda m: called.append(m)) is None
    assert not called  # refused from the blocks alone, before anything is built or traced
    # a period that does not divide the block count (Gemma-2's 2 into 5)
    g = _model("gemma2", 5)
    assert repeated_capture(g, _build("gemma2"), lambda m: called.append(m)) is None
    assert not called


def test_a_block_that_reads_the_layer_count_is_captured_whole():
    class Scaled(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return x + self.lin(x) / self.config.num_hidden_layers

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return x + self.lin(x)

    assert _reads_count(Scaled(None)) and not _reads_count(Plain())


def _checkpoint(tmp_path, model, name: str):
    d = tmp_path / name
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(d, max_shard_size="40KB")
    return d


@pytest.mark.parametrize("stream", ["always", "never"])
def test_the_command_writes_what_a_whole_capture_writes(tmp_path, capsys, stream):
    """Streamed (meta-device capture) and in memory (the loaded model, self-checked)."""
    ckpt = _checkpoint(tmp_path, _model("llama", 4).to(torch.bfloat16), "llama")
    outs = {}
    for how, extra in (("repeated", []), ("whole", ["--whole-capture"])):
        outs[how] = tmp_path / how
        assert main(["coalesce", str(ckpt), "--stream", stream, "--width", "0.5", "--depth",
                     "0.5", "-o", str(outs[how]), "--max-shard-size", "8KB", *extra]) == 0
        err = capsys.readouterr().err
        assert (REPEATED in err) == (how == "repeated"), err
    a, _ = load_level(outs["repeated"])
    b, _ = load_level(outs["whole"])
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == torch.bfloat16 and torch.equal(sa[k], sb[k]), k
    for f in ("mapping.json", "weights.safetensors.index.json"):  # the index: streamed only
        a_file, b_file = outs["repeated"] / f, outs["whole"] / f
        assert a_file.is_file() == b_file.is_file() == (f == "mapping.json" or stream == "always")
        if a_file.is_file():
            assert a_file.read_bytes() == b_file.read_bytes(), f
    x = torch.randint(0, 96, (2, 9))
    assert torch.equal(a.eval()(x).logits, b.eval()(x).logits)
    # the level directory says how it was captured
    assert REPEATED in json.dumps(json.loads((outs["repeated"] / "level.json").read_text()))


def test_inspect_by_repetition_reports_what_a_whole_capture_reports(tmp_path, capsys):
    """`vcyclefx inspect` captures as coalesce does: the same spaces, chains, ties, node and
    parameter counts as with --whole-capture; only the capture note differs."""
    ckpt = _checkpoint(tmp_path, _model("llama", 4), "llama")
    reports = {}
    for how, extra in (("repeated", []), ("whole", ["--whole-capture"])):
        assert main(["inspect", str(ckpt), "--json", *extra]) == 0
        reports[how] = json.loads(capsys.readouterr().out)
    notes = {how: r.pop("notes") for how, r in reports.items()}
    for r in reports.values():
        r.pop("analysis_seconds")
    assert reports["repeated"] == reports["whole"]
    assert reports["whole"]["chains"][0]["blocks"] == 4
    assert any(REPEATED in n for n in notes["repeated"])
    assert not any(REPEATED in n for n in notes["whole"])


def test_in_memory_the_blocks_are_grown_on_the_meta_device(monkeypatch):
    """A loaded model captured by repetition: the depth pass grows a level whose tensors are all
    meta (no copy of every block: a second model's memory), and the level then holds the
    model's own tensors, ties kept."""
    from passes.depth import DepthPass

    model = _model("gpt2", 4)
    grown_from = []
    call = DepthPass.__call__
    monkeypatch.setattr(DepthPass, "__call__", lambda self, level, plan: (
        grown_from.append([t.device.type for t in level.state_dict().values()]),
        call(self, level, plan))[1])
    ids = torch.randint(0, 96, (2, 7))
    level = captured_by_repetition(model, (ids,), recipe_of(model))
    assert level is not None and len(grown_from) == 1
    assert grown_from[0] and set(grown_from[0]) == {"meta"}
    mine = {n: t.data_ptr() for n, t in model.state_dict().items()}
    assert {n: t.data_ptr() for n, t in level.state_dict().items()} == mine
    assert level.lm_head.weight is level.transformer.wte.weight
    assert torch.equal(_logits(level(ids)), _logits(model(ids)))

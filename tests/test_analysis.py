"""The analysis finds exactly the expected spaces, chains and tied tensors, from op semantics."""

from __future__ import annotations

import pytest
import torch

import vcyclefx as vf
from tests.conftest import captured
from vcyclefx import zoo
from vcyclefx.analysis.analyze import analyze


def resizable(a):
    return [s for s in a.spaces if s.resizable]


def by_size(spaces, size, unit=None):
    return [s for s in spaces if s.size == size and (unit is None or s.unit == unit)]


@pytest.mark.parametrize("n_layer,n_head", [(2, 4), (3, 2)])
def test_gpt2_has_one_residual_L_head_and_L_ffn_spaces_and_one_chain(n_layer, n_head):
    model, x = zoo.gpt2(n_layer=n_layer, n_head=n_head, n_embd=64)
    a = analyze(vf.capture(model, x))
    spaces = resizable(a)
    residual = by_size(spaces, 64, unit=1)
    heads = by_size(spaces, n_head, unit=64 // n_head)
    ffn = by_size(spaces, 256, unit=1)
    assert (len(residual), len(heads), len(ffn)) == (1, n_layer, n_layer)
    assert len(spaces) == 1 + 2 * n_layer
    assert {m.tensor for m in residual[0].members} >= {"lm_head.weight", "transformer.wpe.weight"}
    assert [len(c) for c in a.chains] == [n_layer]
    assert a.chains[0].container == "transformer.h"
    # the embedding is the LM head: one tensor, two names, both roles
    assert a.tied == ["lm_head.weight"]
    assert set(a.tensors["lm_head.weight"].aliases) == {"lm_head.weight", "transformer.wte.weight"}
    assert a.roles[("lm_head.weight", 1)] == {"producer", "consumer"}
    # head_dim is pinned by the attention contraction, with the reason
    pinned_hd = [s for s in a.spaces if s.size == 64 // n_head and not s.resizable]
    assert len(pinned_hd) == n_layer and all("q·kᵀ" in s.reason for s in pinned_hd)


def test_bert_post_norm_token_types_and_tied_decoder():
    _, _, level = captured("bert")
    a = analyze(level)
    spaces = resizable(a)
    assert len(by_size(spaces, 64, unit=1)) == 1
    assert len(by_size(spaces, 4, unit=16)) == 2
    assert len(by_size(spaces, 128, unit=1)) == 2
    assert len(spaces) == 5
    assert [len(c) for c in a.chains] == [2]
    assert "bert.embeddings.word_embeddings.weight" in a.tied
    types = [s for s in a.spaces if "token_type_embeddings" in s.key]
    assert types and not types[0].resizable and "embedding" in types[0].reason


def test_llama_head_spaces_keep_key_value_groups():
    model, x = zoo.llama(n_layer=2, n_head=8, n_kv=4, hidden=64)
    a = analyze(vf.capture(model, x))
    heads = [s for s in resizable(a) if s.kind == "heads"]
    assert len(heads) == 2
    for s in heads:
        assert s.size == 4  # one unit per key/value head ...
        q = [m for m in s.members if "q_proj" in m.tensor]
        assert q and q[0].path == "0.0"  # ... and q_proj's rows are (kv head, query in group, dim)
    reps = [s for s in a.spaces if "replication" in s.reason]
    assert len(reps) == 2 and all(s.size == 2 for s in reps)
    rotary = [s for s in a.spaces if any("inv_freq" in m.tensor for m in s.members)]
    assert rotary and not any(s.resizable for s in rotary)
    assert [len(c) for c in a.chains] == [2]


def test_deit_patch_embedding_cls_token_and_three_heads():
    _, _, level = captured("deit")
    a = analyze(level)
    spaces = resizable(a)
    residual = by_size(spaces, 192, unit=1)
    assert len(residual) == 1
    names = {m.tensor for m in residual[0].members}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"} <= names
    assert len(by_size(spaces, 3, unit=64)) == 2
    assert len(by_size(spaces, 768, unit=1)) == 2
    conv_in = [s for s in a.spaces if s.key == "patch_embed.proj.weight[1]"]
    assert conv_in and "model input" in conv_in[0].reason


def test_torchvision_vit_batch_times_heads_views_give_per_layer_head_spaces():
    _, _, level = captured("vit")
    a = analyze(level)
    spaces = resizable(a)
    assert len(by_size(spaces, 4, unit=16)) == 2
    assert len(by_size(spaces, 64, unit=1)) == 1
    assert len(by_size(spaces, 128, unit=1)) == 2
    assert [len(c) for c in a.chains] == [2]


def test_resnet_channel_spaces_follow_residual_adds():
    _, _, level = captured("resnet18")
    a = analyze(level)
    spaces = resizable(a)
    assert sorted(s.size for s in spaces) == [64, 64, 64, 128, 128, 128, 256, 256, 256, 512, 512, 512]
    stem = a.space_of(a.tensors["conv1.weight"].dims[0])
    members = {(m.tensor, m.axis, m.role) for m in stem.members}
    assert ("layer1.0.conv2.weight", 0, "producer") in members
    assert ("layer1.1.conv2.weight", 0, "producer") in members
    assert ("layer1.1.conv1.weight", 1, "consumer") in members
    assert ("bn1.running_mean", 0, "producer") in members
    last = a.space_of(a.tensors["fc.weight"].dims[1])
    assert ("layer4.0.downsample.0.weight", 0, "producer") in {(m.tensor, m.axis, m.role) for m in last.members}
    assert [(c.container, len(c)) for c in a.chains] == [("layer1", 2)]


def test_nanogpt_through_symbolic_trace_matches_its_structure():
    _, _, level = captured("nanogpt")
    assert vf.level.level_info(level).frontend == "fx"
    a = analyze(level)
    assert len(resizable(a)) == 5
    assert a.tied == ["lm_head.weight"]
    assert [len(c) for c in a.chains] == [2]


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_every_parameter_axis_has_a_role_or_a_pin_reason(name):
    _, _, level = captured(name)
    a = analyze(level)
    params = dict(level.named_parameters())
    checked = 0
    for tname, t in a.tensors.items():
        if tname not in params:
            continue
        for ax, d in enumerate(t.dims):
            for leaf in a.table.leaves(d):
                if leaf.size == 1:
                    continue
                space = a.space_of(leaf)
                assert space is not None, (tname, ax)
                if space.resizable:
                    roles = a.roles.get((tname, ax), set())
                    assert roles & {"producer", "consumer"}, (tname, ax)
                else:
                    assert space.reason, (tname, ax)
                checked += 1
    assert checked >= len(params)


def test_unsupported_op_names_the_node_and_how_to_register():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.kthvalue(self.w(x), 2, dim=-1).values

    level = vf.capture(Odd(), (torch.randn(2, 8),))
    with pytest.raises(vf.UnsupportedOp) as e:
        analyze(level)
    msg = str(e.value)
    assert "kthvalue" in msg and "register_rule" in msg and "%kthvalue" in msg


def test_uncapturable_model_names_the_front_end_and_what_to_try():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # control flow on tensor values
                return x * 2
            return x

    with pytest.raises(vf.CaptureError) as e:
        vf.capture(DataDependent(), (torch.randn(2, 3),))
    assert "front-end 'export'" in str(e.value) and "DataDependent" in str(e.value)
    with pytest.raises(vf.CaptureError) as e:
        vf.capture(DataDependent(), (torch.randn(2, 3),), frontend="fx")
    assert "front-end 'fx'" in str(e.value) and "symbolic_trace" in str(e.value)


def test_non_float_parameters_are_rejected_at_capture():
    m = torch.nn.Linear(4, 4)
    m.weight = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(vf.CaptureError, match="weight.*int32"):
        vf.capture(m, (torch.randn(2, 4),))


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_capture_at_batch2_seq16_runs_at_batch3_seq24(name):
    from tests.conftest import other_inputs, output_tensor, rel_error

    model, example, level = captured(name)
    x = other_inputs(example)
    with torch.no_grad():
        got = output_tensor(level(*x))
        want = output_tensor(model(*x))
    assert got.shape == want.shape and got.shape[0] == 3
    if example[0].dtype == torch.long:
        assert got.shape[1] == 24
    assert rel_error(got, want) < 1e-6


def test_level_train_and_eval_switch_baked_dropout():
    model, x = zoo.gpt2()
    level = vf.capture(model, x)  # zoo models are built in training mode
    assert level.training
    torch.manual_seed(0)
    with torch.no_grad():
        train_out = level(*x).logits
        level.eval()
        eval_out = level(*x).logits
        model.eval()
        want = model(*x).logits
    assert not level.training
    assert float((eval_out - want).abs().max()) == 0.0
    assert float((train_out - want).abs().max()) > 1e-3  # dropout was active in training mode


def test_moving_a_level_moves_the_device_literals_of_its_graph():
    """Export bakes the capture device into factory ops (arange(..., device=cpu)); after
    .to(device) the level must make its tensors on the new device (meta stands in for CUDA)."""
    model, x = zoo.gpt2()
    level = vf.capture(model, x)
    level.to("meta")
    out = level(torch.randint(0, 100, (3, 24), device="meta"))
    assert out.logits.device.type == "meta" and tuple(out.logits.shape) == (3, 24, 128)
    devices = {str(n.kwargs["device"]) for n in level.graph.nodes if "device" in n.kwargs}
    assert devices == {"meta"}


def test_a_deep_copy_of_a_level_switches_its_own_mode():
    import copy

    model, x = zoo.gpt2()
    level = vf.capture(model, x)
    twin = copy.deepcopy(level)
    twin.eval()
    flags = lambda m: [n.args[2] for n in m.graph.nodes if n.target == torch.ops.aten.dropout.default]  # noqa: E731
    assert level.training and all(flags(level))
    assert not twin.training and not any(flags(twin))

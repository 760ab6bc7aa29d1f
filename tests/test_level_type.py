"""A level is a real type: torch.save/torch.load, copy.deepcopy and a spawned process all give
a level that computes the same outputs; a .pt2 saved from a Hugging Face model loads on the
command line; a refused training run writes nothing."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import vcyclefx as vf
from tests.conftest import other_inputs, output_tensor
from vcyclefx import zoo
from vcyclefx.level import Level

REPO = Path(__file__).resolve().parents[1]


def _levels():
    model, example = zoo.gpt2()
    small, mapping = vf.coalesce(model, example, width=0.5, depth=0.5)
    return example, small.eval(), mapping


def _out(level, x):
    with torch.no_grad():
        return output_tensor(level(*x))


def test_a_level_survives_torch_save_and_load_with_identical_outputs_and_can_be_rewritten():
    example, small, mapping = _levels()
    buf = io.BytesIO()
    torch.save(small, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert isinstance(back, Level) and back.training is False
    x = other_inputs(example)
    assert torch.equal(_out(back, x), _out(small, x))
    assert back.state_dict().keys() == small.state_dict().keys()
    assert back.lm_head.weight is back.transformer.wte.weight  # the tie is kept
    restored, _ = vf.decoalesce(back, mapping=mapping)  # still a level vcyclefx can rewrite
    again, _ = vf.decoalesce(small, mapping=mapping)
    assert torch.equal(_out(restored.eval(), x), _out(again.eval(), x))


def test_deepcopy_of_a_level_is_a_level_in_the_same_mode_with_its_own_tensors():
    example, small, _ = _levels()
    small.train()
    twin = copy.deepcopy(small)
    assert isinstance(twin, Level) and twin.training is True
    assert {p.data_ptr() for p in twin.parameters()}.isdisjoint(p.data_ptr() for p in small.parameters())
    twin.eval(), small.eval()
    assert torch.equal(_out(twin, example), _out(small, example))
    assert not any(k in vars(twin) for k in ("train", "eval", "_apply"))  # no patched methods


def _child(level, x, queue):
    with torch.no_grad():
        queue.put(output_tensor(level(*x)).numpy())  # plain bytes, not shared memory


def test_a_level_passed_to_a_spawned_process_computes_the_same_outputs():
    example, small, _ = _levels()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(small, example, queue))
    proc.start()
    got = queue.get(timeout=240)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert torch.equal(torch.from_numpy(got), _out(small, example))


def _cli(*args, cwd=None, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "vcyclefx.cli", *args], capture_output=True,
                          text=True, cwd=cwd or REPO, env=env, timeout=600)


def test_coalesce_of_a_pt2_saved_from_a_hugging_face_model_works_in_a_fresh_process(tmp_path):
    model, example = zoo.gpt2()
    path = tmp_path / "gpt2.pt2"
    torch.export.save(torch.export.export(model, example, strict=False), path)
    # a fresh interpreter has not imported transformers: the output type is found in the archive
    res = _cli("coalesce", str(path), "--width", "0.5", "--depth", "0.5", "-o", str(tmp_path / "s"))
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "s" / "level.json").read_text())
    assert summary["source_class"] == "transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel"
    from vcyclefx.export.leveldir import load_level

    small, _ = load_level(tmp_path / "s")
    assert _out(small.eval(), example).shape == (2, 16, 128)


def _net(output: str) -> str:
    """The source of a two-layer ``Net`` whose forward returns ``output`` (written into the
    modules below, which the tests import in fresh processes)."""
    return ("class Net(torch.nn.Module):\n"
            "    def __init__(self):\n"
            "        super().__init__()\n"
            "        self.a = torch.nn.Linear(8, 16)\n"
            "        self.b = torch.nn.Linear(16, 8)\n"
            "    def forward(self, x):\n"
            f"        return {output}\n")


_OUTPUT_MODULE = '''
import dataclasses, torch
import torch.utils._pytree as pytree

@dataclasses.dataclass
class Out:
    y: torch.Tensor

pytree.register_dataclass(Out, serialized_type_name="vcx_custom_outputs.Out")

''' + _net("Out(self.b(torch.relu(self.a(x))))")


def test_a_pt2_whose_output_type_module_is_not_installed_gets_a_clear_error(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "vcx_custom_outputs.py").write_text(_OUTPUT_MODULE)
    path = tmp_path / "net.pt2"
    code = ("import torch, vcx_custom_outputs as m; net = m.Net(); "
            f"torch.export.save(torch.export.export(net, (torch.randn(2, 8),)), {str(path)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pkg, timeout=300)
    # with the module importable the archive loads ...
    ok = _cli("inspect", str(path), env_extra={"PYTHONPATH": f"{REPO}{os.pathsep}{pkg}"})
    assert ok.returncode == 0, ok.stderr
    # ... without it the error names the type, the module and the fix
    res = _cli("inspect", str(path), cwd=tmp_path)
    assert res.returncode == 2
    assert "vcx_custom_outputs.Out" in res.stderr and "'vcx_custom_outputs'" in res.stderr
    assert "install the package" in res.stderr


@pytest.mark.parametrize("data", ["missing", "empty", "binary"])
def test_a_refused_training_run_leaves_no_output_directory(tmp_path, data, capsys):
    from vcyclefx.cli import main

    src = tmp_path / "data"
    if data == "missing":
        path = src / "missing.txt"
    else:
        src.mkdir()
        if data == "binary":
            for i in range(3):
                (src / f"f{i}.bin").write_bytes(b"\x00\x01\x02" * 100)
        path = src
    out = tmp_path / "run"
    rc = main(["train", "--schedule", "baseline", "--data", str(path), "-o", str(out), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("vcyclefx train: error:") and str(path) in err, err
    assert not out.exists()


def test_a_level_captured_from_a_view_runs_on_plain_inputs():
    # export guards a view on its base tensor ("input_ids._base.size()[1] != ..."); capture
    # takes copies, so a level made from a slice of a (B, T + 1) batch runs on any batch
    model, _ = zoo.gpt2()
    batch = torch.randint(0, 128, (2, 17))
    level = vf.capture(model, (batch[:, :-1],))
    plain = torch.randint(0, 128, (3, 16))
    with torch.no_grad():
        assert torch.equal(level.eval()(plain).logits, model.eval()(plain).logits)


def _bart():
    T = zoo._hf_quiet()
    torch.manual_seed(0)
    cfg = T.BartConfig(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2,
                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                       decoder_ffn_dim=128, max_position_embeddings=64, use_cache=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    dec = torch.randint(3, 128, (2, 8), generator=g)
    return T.BartForConditionalGeneration(cfg).eval(), ids, dec


def test_keyword_example_inputs_capture_an_encoder_decoder_without_a_wrapper():
    model, ids, dec = _bart()
    with torch.no_grad():
        ref = model(input_ids=ids, decoder_input_ids=dec).logits
    # keyword inputs as example_kwargs= or as a dict; the level takes them positionally or by name
    big, mapping = vf.decoalesce(model, (ids,), example_kwargs={"decoder_input_ids": dec},
                                 width=2.0)
    assert big.info.input_names == ("input_ids", "decoder_input_ids")
    with torch.no_grad():
        assert float((big.eval()(ids, dec).logits - ref).abs().max() / ref.abs().max()) <= 1e-5
        other = (torch.randint(3, 128, (3, 10)), torch.randint(3, 128, (3, 5)))
        assert big(other[0], decoder_input_ids=other[1]).logits.shape == (3, 5, 128)
    back, _ = vf.coalesce(big, mapping=mapping)
    level0 = vf.capture(model, {"input_ids": ids, "decoder_input_ids": dec})
    for k, v in level0.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    cycle = vf.VCycle(model, (ids,), example_kwargs={"decoder_input_ids": dec}, levels=2,
                      width=0.5, depth=0.5, steps=[1, 1, 1])
    for stage in cycle:
        pass
    fresh, _, _ = _bart()
    fresh.load_state_dict(cycle.result().state_dict(), strict=True)


def test_a_level_directory_holds_its_weights_once_and_loads_them_from_the_safetensors(tmp_path):
    from vcyclefx.export.leveldir import level_to_bytes, load_level, save_level

    example, small, mapping = _levels()
    save_level(small, tmp_path / "s", mapping)
    pt2, weights = tmp_path / "s" / "level.pt2", tmp_path / "s" / "weights.safetensors"
    assert _weight_bytes(pt2) == 0  # the graph, not a second copy of the weights
    ep = torch.export.load(pt2)
    assert ep.state_dict and all(t.is_meta for t in ep.state_dict.values())
    back, _ = load_level(tmp_path / "s")
    assert not any(t.is_meta for t in back.state_dict().values())
    assert back.lm_head.weight is back.transformer.wte.weight
    x = other_inputs(example)
    assert torch.equal(_out(back.eval(), x), _out(small, x))
    assert _weight_bytes(io.BytesIO(level_to_bytes(small)["pt2"])) == 0  # pickled: once too


def test_a_level_loaded_while_it_is_written_is_assembled_from_the_program_just_written(
        tmp_path, monkeypatch):
    """Inside save_level's `also` (the --format hf/module step), load_level of the directory
    being written takes the ExportedProgram just written instead of deserialising level.pt2;
    the level is the one the file gives."""
    from vcyclefx.export import leveldir

    example, small, mapping = _levels()
    seen = {}

    def refuse(*args, **kwargs):
        raise AssertionError("level.pt2 read back while it is being written")

    def also(tmp):
        with monkeypatch.context() as m:
            m.setattr(leveldir, "load_pt2", refuse)
            seen["level"], _ = leveldir.load_level(tmp)

    leveldir.save_level(small, tmp_path / "s", mapping, also=also)
    assert leveldir._WRITTEN == {}
    back, _ = leveldir.load_level(tmp_path / "s")  # from the file
    during = seen["level"]
    assert during.state_dict().keys() == back.state_dict().keys()
    assert all(torch.equal(t, back.state_dict()[n]) for n, t in during.state_dict().items())
    assert during.lm_head.weight is during.transformer.wte.weight
    x = other_inputs(example)
    assert torch.equal(_out(during.eval(), x), _out(back.eval(), x))
    assert torch.equal(_out(during, x), _out(small, x))


def _weight_bytes(archive) -> int:
    with zipfile.ZipFile(archive) as z:
        return sum(i.file_size for i in z.infolist() if "/data/weights/weight_" in i.filename)


def test_loading_a_hugging_face_level_does_not_import_its_modeling_code(tmp_path):
    from vcyclefx.export.leveldir import save_level

    example, small, mapping = _levels()
    save_level(small, tmp_path / "s", mapping)
    torch.save(_out(small, example), tmp_path / "want.pt")
    code = ("import sys, torch\nfrom vcyclefx.export.leveldir import load_level\n"
            f"level, _ = load_level({str(tmp_path / 's')!r})\n"
            f"x = torch.load({str(tmp_path / 'want.pt')!r})\n"
            "from vcyclefx.level import level_info\n"
            "with torch.no_grad():\n    y = level.eval()(*level_info(level).example_inputs).logits\n"
            "print(torch.equal(x, y), 'transformers.models.gpt2.modeling_gpt2' in sys.modules,"
            " 'transformers.modeling_outputs' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert res.returncode == 0, res.stderr
    # the same logits; the output type's module imported, not GPT-2's modeling code
    assert res.stdout.split() == ["True", "False", "True"]


_OP_MODULE = '''
import torch

@torch.library.custom_op("vcx_test::double", mutates_args=())
def double(x: torch.Tensor) -> torch.Tensor:
    return x * 2

@double.register_fake
def _(x):
    return torch.empty_like(x)

''' + _net("self.b(double(torch.relu(self.a(x))))")


def test_a_level_whose_graph_needs_an_op_its_model_module_registers_loads_in_a_fresh_process(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "vcx_custom_ops.py").write_text(_OP_MODULE)
    out = tmp_path / "s"
    make = ("import torch, vcyclefx as vf, vcx_custom_ops as m\n"
            "from vcyclefx.export.leveldir import save_level\n"
            "torch.manual_seed(0)\nlevel = vf.capture(m.Net(), (torch.randn(2, 8),))\n"
            f"save_level(level, {str(out)!r})\n"
            f"torch.save(level(*level.info.example_inputs).detach(), {str(tmp_path / 'want.pt')!r})")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{pkg}"}
    subprocess.run([sys.executable, "-c", make], check=True, env=env, timeout=300)
    # the fresh process does not import the module: loading fails without its op, imports the
    # module of the level's source class and loads
    load = ("import sys, torch\nfrom vcyclefx.export.leveldir import load_level\n"
            f"level, _ = load_level({str(out)!r})\n"
            "from vcyclefx.level import level_info\n"
            "y = level(*level_info(level).example_inputs).detach()\n"
            f"print(torch.allclose(y, torch.load({str(tmp_path / 'want.pt')!r}), rtol=0, atol=1e-6), "
            "'vcx_custom_ops' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "True"]


def _graph_signature(ep) -> list:
    return [(n.op, str(n.target), n.name, str(n.args),
             str(getattr(n.meta.get("val"), "shape", None)),
             str(n.meta["val"].stride()) if isinstance(n.meta.get("val"), torch.Tensor) else "")
            for n in ep.graph.nodes]


def test_quick_load_gives_the_graph_torch_export_load_gives_with_fewer_sympy_parses(tmp_path, monkeypatch):
    import sympy
    import typing

    from torch._export.serde import serialize as serde

    from vcyclefx.export.leveldir import quick_load, save_level

    _, small, mapping = _levels()
    save_level(small, tmp_path / "s", mapping)
    calls = []
    real = sympy.sympify
    monkeypatch.setattr(sympy, "sympify", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    plain = torch.export.load(tmp_path / "s" / "level.pt2")
    n_plain = len(calls)
    calls.clear()
    with quick_load():
        active = serde.typing
        with quick_load():  # nested: the outer one's memo stays in effect
            quick = torch.export.load(tmp_path / "s" / "level.pt2")
        assert serde.typing is active and active is not typing
        # a name bound to a value that cannot be a key is parsed as torch would, not refused
        s0 = sympy.Symbol("s0")
        assert serde.sympy.sympify("2*s0", locals={"s0": s0, "odd": [1]}) == 2 * s0
    assert serde.typing is typing and serde.sympy is sympy  # put back
    assert _graph_signature(quick) == _graph_signature(plain)
    assert str(quick.range_constraints) == str(plain.range_constraints)
    assert str(quick.graph_signature) == str(plain.graph_signature)
    # the deserialiser's sizes parsed once per distinct string, not once per occurrence (what
    # remains is sympy's and the shape environment's own calls)
    assert n_plain > 100 and len(calls) < n_plain / 2


def test_a_level_directory_written_with_the_weights_in_its_graph_still_loads_and_streams(tmp_path):
    """Level directories written before the weights were kept out of ``level.pt2``."""
    from safetensors.torch import load_file

    from vcyclefx.export.leveldir import load_level, save_level
    from vcyclefx.export.program import program_of

    example, small, mapping = _levels()
    new, old = tmp_path / "new", tmp_path / "old"
    save_level(small, new, mapping)
    save_level(small, old, mapping)
    torch.export.save(program_of(small), old / "level.pt2")  # the earlier form: weights inside
    assert _weight_bytes(old / "level.pt2") > 0
    back, _ = load_level(old)
    x = other_inputs(example)
    assert torch.equal(_out(back.eval(), x), _out(small, x))
    outs = {}
    for d in (new, old):
        outs[d] = tmp_path / f"big-{d.name}"
        res = _cli("decoalesce", str(d), "-o", str(outs[d]), "--stream", "always")
        assert res.returncode == 0, res.stderr
    a, b = load_file(outs[new] / "weights.safetensors"), load_file(outs[old] / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quick_save_writes_the_program_torch_export_save_writes_without_its_discarded_check(monkeypatch):
    """torch.export.save checks that a canonical form of the serialised program exists and
    discards it; save_program skips that check and writes the same program."""
    import io
    import zipfile

    from torch._export.serde import serialize as serde

    from vcyclefx.export.leveldir import _graph_program, quick_save, save_program

    _, small, _ = _levels()
    checked = []
    real = serde.canonicalize
    monkeypatch.setattr(serde, "canonicalize", lambda *a, **k: checked.append(1) or real(*a, **k))

    def program_json(level, save) -> bytes:
        buf = io.BytesIO()
        save(level, buf)
        z = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
        return z.read(next(n for n in z.namelist() if n.endswith("models/model.json")))

    plain = program_json(small, lambda lv, f: torch.export.save(_graph_program(lv), f))
    assert len(checked) == 1
    with quick_save():
        skip = serde.canonicalize
        with quick_save():  # nested: the outer one stays in effect
            assert serde.canonicalize is skip
        assert serde.canonicalize is skip
    assert serde.canonicalize.__name__ == "<lambda>"  # put back: the (patched) original
    quick = program_json(small, save_program)
    assert len(checked) == 1  # not called again
    assert quick == plain


def test_a_loaded_moe_level_directory_decoalesces_with_its_mapping(tmp_path):
    """Loading a level's program shares the symbolic-size arithmetic that the capture gives
    each user its own copy of (a mixture-of-experts block's `2 * batch * seq`, one node for
    every block); the loaded level is normalised as a capture is, so its blocks have the
    capture's node lists and the mapping's links fit: the level directory of a coalesced
    Mixtral decoalesces with its mapping.json as the level in memory does."""
    import transformers

    from vcyclefx.export.leveldir import load_level, save_level

    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=256, max_position_embeddings=64, num_local_experts=4,
        num_experts_per_tok=2, use_cache=False)).eval()
    x = (torch.randint(0, 256, (2, 16)),)
    small, mapping = vf.coalesce(model, x, width=0.5, depth=0.5)
    save_level(small, tmp_path / "small", mapping)
    loaded, loaded_mapping = load_level(tmp_path / "small")
    from collections import Counter

    from vcyclefx.analysis.ownership import ownership

    ops = [Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
           for gm in (loaded, small)]
    assert ops[0] == ops[1]  # the same ops, each size computation once per user
    blocks = [ownership(gm)[0] for gm in (loaded, small)]
    assert [len(blocks[0][f"model.layers.{i}"]) for i in range(2)] == \
        [len(blocks[1][f"model.layers.{i}"]) for i in range(2)]
    want, _ = vf.decoalesce(small, mapping=mapping)
    got, _ = vf.decoalesce(loaded, mapping=loaded_mapping)
    assert got.state_dict().keys() == want.state_dict().keys()
    for k, v in want.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    assert torch.equal(_out(got, x), _out(want, x))

"""The capture cache (vcyclefx.capture.cache): a streamed command on a checkpoint whose capture
is cached writes exactly what a fresh capture writes (every tensor, mapping.json, the graph node
for node), binds the checkpoint it is given (not the one first captured), and imports no
modeling code; the key follows what the graph depends on and nothing else; a damaged entry is
captured again and an unwritable cache does not fail the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from vcyclefx.capture import cache
from vcyclefx.cli import main
from vcyclefx.export.leveldir import load_level
from vcyclefx.export.shards import ShardReader

transformers.logging.set_verbosity_error()

HIT = "from the capture cache"


def _llama(seed: int = 0, **over):
    torch.manual_seed(seed)
    cfg = dict(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=96, use_cache=False)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, **over})).eval()


def _gpt2(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=4, n_embd=32, n_head=4, vocab_size=96, n_positions=64, use_cache=False)).eval()


def _checkpoint(path, model, dtype=torch.bfloat16, shard="40KB"):
    model = model.to(dtype)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(path, max_shard_size=shard)
    return path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "captures"
    monkeypatch.setenv(cache.ENV, str(d))
    return d


def _entries(root) -> list:
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def _run(capsys, *args) -> str:
    assert main([*args]) == 0
    return capsys.readouterr().err


def _graph(gm) -> list[tuple]:
    """Every node: op, target, name, arguments, and its metadata but where it came from (the
    ids of the graphs a node passed through differ from process to process)."""
    out = []
    for n in gm.graph.nodes:
        meta = {k: str(v) for k, v in n.meta.items() if k not in ("from_node", "stack_trace")}
        out.append((n.op, str(n.target), n.name, str(n.args), str(n.kwargs), sorted(meta.items())))
    return out


def _same_level(a, b) -> None:
    """Two level directories hold the same level: every tensor, mapping.json, the graph."""
    la, _ = load_level(a)
    lb, _ = load_level(b)
    sa, sb = la.state_dict(), lb.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert (a / "mapping.json").read_bytes() == (b / "mapping.json").read_bytes()
    assert _graph(la) == _graph(lb)
    ja, jb = (json.loads((d / "level.json").read_text()) for d in (a, b))
    ja.pop("created"), jb.pop("created")
    assert ja == jb


@pytest.mark.parametrize("family,extra", [("llama", []), ("gpt2", ["--whole-capture"])])
def test_a_cached_capture_writes_what_a_fresh_capture_writes(tmp_path, capsys, monkeypatch,
                                                             cache_dir, family, extra):
    """Llama captured by repetition (the two-block level is cached and grown on a hit); GPT-2
    captured whole with its tied embedding and head. The cache is filled from checkpoint ``a``
    and read for ``b``, which has other weights and the same config: the cached capture is
    bound to ``b``'s own tensors and writes what a fresh capture of ``b`` writes."""
    make = {"llama": _llama, "gpt2": _gpt2}[family]
    a = _checkpoint(tmp_path / "a", make(0))
    b = _checkpoint(tmp_path / "b", make(1))
    args = ["--width", "0.5", "--depth", "0.5", "--stream", "always", "--max-shard-size", "8KB",
            *extra]
    err = _run(capsys, "coalesce", str(a), "-o", str(tmp_path / "a1"), *args)
    assert HIT not in err and len(_entries(cache_dir)) == 1
    err = _run(capsys, "coalesce", str(b), "-o", str(tmp_path / "b2"), *args)
    assert HIT in err and len(_entries(cache_dir)) == 1
    monkeypatch.setenv(cache.ENV, "off")
    err = _run(capsys, "coalesce", str(b), "-o", str(tmp_path / "b1"), *args)
    assert HIT not in err
    _same_level(tmp_path / "b1", tmp_path / "b2")
    small, _ = load_level(tmp_path / "b2")
    assert not torch.equal(small.state_dict()["lm_head.weight"],
                           load_level(tmp_path / "a1")[0].state_dict()["lm_head.weight"])
    if family == "gpt2":
        assert small.lm_head.weight is small.transformer.wte.weight
        return
    # growing a checkpoint reads the same entry and writes what a fresh capture writes
    grow = ["--width", "2", "--stream", "always"]
    assert HIT not in _run(capsys, "decoalesce", str(b), "-o", str(tmp_path / "g1"), *grow)
    monkeypatch.setenv(cache.ENV, str(cache_dir))
    assert HIT in _run(capsys, "decoalesce", str(b), "-o", str(tmp_path / "g2"), *grow)
    _same_level(tmp_path / "g1", tmp_path / "g2")


def test_a_hit_imports_no_modeling_code(tmp_path, capsys, cache_dir):
    """The second command loads the cached graph in a fresh process without importing
    transformers' Llama modeling code (the cost the cache saves)."""
    ckpt = _checkpoint(tmp_path / "llama", _llama())
    args = ["coalesce", str(ckpt), "--width", "0.5", "--depth", "0.5", "--stream", "always"]
    _run(capsys, *args, "-o", str(tmp_path / "first"))
    script = ("import json, sys\nfrom vcyclefx.cli import main\n"
              f"assert main({[*args, '-o', str(tmp_path / 'second')]!r}) == 0\n"
              "print(json.dumps(sorted(m for m in sys.modules if m.startswith('transformers'))))")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ}, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert HIT in res.stderr
    imported = json.loads(res.stdout.strip().splitlines()[-1])
    assert "transformers.modeling_outputs" in imported  # the output type the graph names
    assert not [m for m in imported if m.startswith("transformers.models.")], imported
    _same_level(tmp_path / "first", tmp_path / "second")


def test_the_key_follows_what_the_graph_depends_on(tmp_path, monkeypatch):
    def key(d, **options):
        return cache.key_of(d, ShardReader(d), {"batch": 2, "seq": 16, "repeat": True, **options})

    base = key(_checkpoint(tmp_path / "a", _llama(0)))
    assert base is not None
    assert key(_checkpoint(tmp_path / "b", _llama(1))) == base  # other weights
    assert key(_checkpoint(tmp_path / "c", _llama(0), shard="20KB")) == base  # other shards
    assert key(_checkpoint(tmp_path / "d", _llama(0), dtype=torch.float16)) != base
    assert key(_checkpoint(tmp_path / "e", _llama(0, rms_norm_eps=1e-5))) != base
    assert key(_checkpoint(tmp_path / "f", _llama(0, num_hidden_layers=6))) != base
    assert key(tmp_path / "a", repeat=False) != base
    assert key(tmp_path / "a", seq=32) != base
    # code from the checkpoint's folder can change under the same config: never cached
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "auto_map": {
        "AutoModelForCausalLM": "modeling_mine.MyModel"}}))
    assert key(tmp_path / "a") is None
    (tmp_path / "a" / "config.json").write_text("{not json")
    assert key(tmp_path / "a") is None
    # vcyclefx's own sources are part of it
    monkeypatch.setattr(cache, "_SOURCES", ["another version"])
    assert key(tmp_path / "b") != base


@pytest.mark.parametrize("damage", ["truncated graph", "grows to blocks the checkpoint lacks"])
def test_a_damaged_entry_is_captured_again_and_replaced(tmp_path, capsys, cache_dir, damage):
    ckpt = _checkpoint(tmp_path / "llama", _llama())
    args = ["coalesce", str(ckpt), "--width", "0.5", "--depth", "0.5", "--stream", "always"]
    _run(capsys, *args, "-o", str(tmp_path / "first"))
    (entry,) = _entries(cache_dir)
    if damage == "truncated graph":
        pt2 = entry / "level.pt2"
        pt2.write_bytes(pt2.read_bytes()[: pt2.stat().st_size // 2])
        why = "cannot be read"
    else:
        meta = json.loads((entry / "entry.json").read_text())
        meta["growth"]["n"] = 6  # the checkpoint has 4 layers
        (entry / "entry.json").write_text(json.dumps(meta))
        why = "no shard holds tensor model.layers.4"
    err = _run(capsys, *args, "-o", str(tmp_path / "second"))
    assert why in err and str(entry) in err and HIT not in err, err
    _same_level(tmp_path / "first", tmp_path / "second")
    assert HIT in _run(capsys, *args, "-o", str(tmp_path / "third"))  # written anew
    _same_level(tmp_path / "first", tmp_path / "third")


def test_an_unwritable_cache_is_reported_and_the_command_succeeds(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(cache.ENV, str(blocker / "captures"))  # under a file: no folder
    ckpt = _checkpoint(tmp_path / "llama", _llama())
    args = ["coalesce", str(ckpt), "--width", "0.5", "--depth", "0.5", "--stream", "always"]
    err = _run(capsys, *args, "-o", str(tmp_path / "out"))
    assert "cannot be written" in err and f"{cache.ENV}=off" in err
    assert (tmp_path / "out" / "level.pt2").is_file()
    for off in ("off", "0", "No"):
        monkeypatch.setenv(cache.ENV, off)
        assert cache.root() is None
    # unset: the captures folder of vcyclefx's cache, beside the driver's corpora
    monkeypatch.delenv(cache.ENV)
    monkeypatch.setenv("VCYCLEFX_CACHE", str(tmp_path / "vc"))
    assert cache.root() == tmp_path / "vc" / "captures"
    from vcyclefx.driver.data import default_cache_dir

    assert default_cache_dir() == tmp_path / "vc"


def test_the_most_recently_used_entries_are_kept(tmp_path, monkeypatch, cache_dir):
    from vcyclefx.capture.frontend import capture

    monkeypatch.setattr(cache, "MAX_ENTRIES", 2)
    level = capture(_llama(), (torch.randint(0, 96, (2, 8)),))
    pending = cache.Pending(level, torch.float32)
    for i, key in enumerate(("k0", "k1", "k2")):
        cache.store(key, pending)
        os.utime(cache_dir / key, (1000 + i, 1000 + i))
    assert [p.name for p in _entries(cache_dir)] == ["k1", "k2"]
    assert cache.load("k1") is not None  # used: now the most recent
    cache.store("k3", pending)
    assert [p.name for p in _entries(cache_dir)] == ["k1", "k3"]
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # no temporaries


def test_a_capture_is_the_graph_its_saved_form_loads_as(tmp_path):
    """Ops whose results nothing reads are dropped at capture, as loading a saved level drops
    them: the level before and after a round trip through level.pt2 makes the same op calls."""
    from vcyclefx.capture.frontend import capture
    from vcyclefx.export.leveldir import save_level

    model = _gpt2()
    level = capture(model, (torch.randint(0, 96, (2, 8)),))
    assert not [n for n in level.graph.nodes
                if n.op == "call_function" and not n.users and not n.is_impure()]
    save_level(level, tmp_path / "lv")
    loaded, _ = load_level(tmp_path / "lv")
    def ops(gm):  # the op calls (a loaded level has no call to export's guard function)
        return [(str(n.target), n.name, str(n.args)) for n in gm.graph.nodes
                if n.op == "call_function"]

    assert ops(level) == ops(loaded)
    x = torch.randint(0, 96, (2, 11))
    assert torch.equal(level(x).logits, loaded(x).logits)

"""Checkpoints larger than memory: `vcyclefx coalesce/decoalesce/interpolate` of a Hugging Face
directory of (sharded) safetensors streams the weights (meta-device capture, one output tensor
at a time, sharded output) and writes exactly what the in-memory path writes. GPT-2 (tied
embedding and head) and float16 run with -m slow; Llama and bfloat16 by default."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from safetensors import safe_open

import vcyclefx as vf
from vcyclefx import zoo
from vcyclefx.capture.specs import model_from_spec
from vcyclefx.cli import main
from vcyclefx.export.leveldir import load_level


def _checkpoint(tmp_path, model, name: str, dtype=torch.float32, shard="20KB"):
    d = tmp_path / name
    model = model.to(dtype)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(d, max_shard_size=shard)
    return d


def _weights(directory) -> dict:
    """Every tensor of a level directory's weight files, by name (aliases included)."""
    level, _ = load_level(directory)
    return level.state_dict()


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("which", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_streamed_coalesce_and_decoalesce_equal_the_in_memory_path_tensor_for_tensor(tmp_path, which):
    model, _ = getattr(zoo, which)()
    ckpt = _checkpoint(tmp_path, model, which)
    assert (ckpt / "model.safetensors.index.json").is_file()  # sharded input
    out = tmp_path / "small"
    assert main(["coalesce", "--stream", "always", str(ckpt), "--width", "0.5", "--depth", "0.5", "-o", str(out),
                 "--max-shard-size", "8KB"]) == 0
    index = json.loads((out / "weights.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded output
    found = model_from_spec(str(ckpt))
    want, want_map = vf.coalesce(found.model, found.example, width=0.5, depth=0.5)
    got = _weights(out)
    _same(got, want.state_dict())
    small, _ = load_level(out)  # written with meta tensors in level.pt2, it runs on its weights
    x = found.example
    assert torch.equal(small.eval()(*x).logits, want.eval()(*x).logits)
    if which == "gpt2":  # tied embedding and LM head: one tensor under both names
        assert small.lm_head.weight is small.transformer.wte.weight
    # back up, streaming from the level directory
    assert main(["decoalesce", "--stream", "always", str(out), "-o", str(tmp_path / "big")]) == 0
    restored, _ = vf.decoalesce(want, mapping=want_map)
    _same(_weights(tmp_path / "big"), restored.state_dict())
    # interpolate, streaming both level directories
    assert main(["interpolate", "--stream", "always", str(tmp_path / "big"), str(tmp_path / "big"), "--alpha", "0.25",
                 "-o", str(tmp_path / "mixed")]) == 0
    _same(_weights(tmp_path / "mixed"), vf.interpolate(restored, restored, 0.25).state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16,
                                   pytest.param(torch.float16, marks=pytest.mark.slow)])
def test_format_hf_of_a_low_precision_checkpoint_keeps_its_dtype_and_loads(tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    model, example = zoo.llama()
    ckpt = _checkpoint(tmp_path, model, "llama", dtype)
    (ckpt / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "small"
    assert main(["coalesce", "--stream", "always", str(ckpt), "--width", "0.5", "--depth", "0.5", "-o", str(out),
                 "--format", "hf"]) == 0
    small = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert small.config.hidden_size == 32 and small.config.num_hidden_layers == 1
    assert {p.dtype for p in small.parameters()} == {dtype}
    level, _ = load_level(out)
    _same({k: v for k, v in small.state_dict().items()},
          {k: v for k, v in level.state_dict().items() if k in small.state_dict()})
    assert (out / "tokenizer_config.json").is_file() and (out / "generation_config.json").is_file()
    card = (out / "README.md").read_text()
    assert "coalesce" in card and "width: 0.5" in card and str(ckpt) in card


def _no_output(tmp_path) -> bool:
    return not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def _run_bad(tmp_path, capsys, ckpt) -> str:
    assert main(["coalesce", "--stream", "always", str(ckpt), "-o", str(tmp_path / "out")]) == 2
    assert _no_output(tmp_path)
    return capsys.readouterr().err


def test_bad_checkpoints_are_named_by_file_and_tensor_and_leave_no_output(tmp_path, capsys):
    model, _ = zoo.llama()
    ckpt = _checkpoint(tmp_path, model, "llama")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    # an index naming a tensor no shard holds
    bad = dict(index, weight_map={**index["weight_map"], "model.extra.weight": shards[0]})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(bad))
    err = _run_bad(tmp_path, capsys, ckpt)
    assert "model.extra.weight" in err and shards[0] in err
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    # a truncated shard
    data = (ckpt / shards[-1]).read_bytes()
    (ckpt / shards[-1]).write_bytes(data[:-100])
    err = _run_bad(tmp_path, capsys, ckpt)
    assert "truncated" in err and shards[-1] in err
    (ckpt / shards[-1]).write_bytes(data)
    # a header whose byte range disagrees with its tensor's dtype and shape (a damaged shard)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k, h in header.items() if k != "__metadata__" and
                len(str(h["data_offsets"][1])) == len(str(h["data_offsets"][1] - 4)))
    header[name]["data_offsets"][1] -= 4  # one float32 short
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    (ckpt / shards[-1]).write_bytes(data[:8] + raw + data[8 + n:])
    err = _run_bad(tmp_path, capsys, ckpt)
    assert "damaged" in err and name in err and shards[-1] in err
    # a missing shard
    (ckpt / shards[-1]).unlink()
    err = _run_bad(tmp_path, capsys, ckpt)
    assert "missing shard" in err and shards[-1] in err


def test_a_shard_that_disagrees_with_the_config_is_refused_before_any_output(tmp_path, capsys):
    model, _ = zoo.llama()
    ckpt = _checkpoint(tmp_path, model, "llama")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    err = _run_bad(tmp_path, capsys, ckpt)
    assert "mlp" in err and "[128, 64]" in err and ".safetensors" in err
    (ckpt / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    err = _run_bad(tmp_path, capsys, ckpt)
    assert "torch.float32" in err and "torch.bfloat16" in err


def test_a_write_error_names_the_shard_and_tensor_and_leaves_no_output(tmp_path, capsys,
                                                                        monkeypatch):
    import builtins

    from vcyclefx.export import shards

    model, _ = zoo.llama()
    ckpt = _checkpoint(tmp_path, model, "llama")

    class FullDisk:  # a file on a disk that fills after 4 KB
        def __init__(self, path, mode):
            self.f, self.n = builtins.open(path, mode), 0

        def write(self, data):
            self.n += len(data)
            if self.n > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def open_(path, mode="r", **kw):  # the writer's files fill the disk, reads are as they are
        return FullDisk(path, mode) if "w" in mode else builtins.open(path, mode, **kw)

    monkeypatch.setattr(shards, "open", open_, raising=False)
    err = _run_bad(tmp_path, capsys, ckpt)
    assert "No space left on device" in err and "weights" in err and "cannot write tensor" in err


def test_large_outputs_replayed_a_block_of_rows_at_a_time_equal_the_in_memory_path(tmp_path,
                                                                                    monkeypatch):
    """An output whose rows come from one row of each of its inputs (the embedding's and the LM
    head's width maps: row i from row i; an MLP matrix's width map and depth mean: row i from
    rows i and i + half of each block's matrix) is read, replayed and written a block of rows at
    a time: the writer gets its blocks one by one (never the whole tensor), and the level equals
    the in-memory one."""
    from vcyclefx.export import shards, stream

    model, _ = zoo.llama()
    ckpt = _checkpoint(tmp_path, model, "llama")
    whole, blocks = [], {}
    write, write_rows = shards.ShardWriter.write, shards.ShardWriter.write_rows

    def one(self, name, t):
        whole.append(name)
        return write(self, name, t)

    def by_rows(self, name, parts):
        def counted():
            for part in parts:
                blocks.setdefault(name, []).append(tuple(part.shape))
                yield part
        return write_rows(self, name, counted())

    monkeypatch.setattr(shards.ShardWriter, "write", one)
    monkeypatch.setattr(shards.ShardWriter, "write_rows", by_rows)
    monkeypatch.setattr(stream, "ROW_BLOCK_BYTES", 1000)  # a few rows of each input at a time
    out = tmp_path / "small"
    assert main(["coalesce", "--stream", "always", str(ckpt), "--width", "0.5", "--depth", "0.5",
                 "-o", str(out)]) == 0
    # the embedding and the LM head (a width map of their columns: row i from row i), 3 rows
    # of 64 float32 columns a block; the MLP's matrices (rows i and i + half of the two blocks'
    # matrices, 4 rows read per row made) a row at a time (1000 bytes are less than the 4 rows
    # of 64 or 128 float32 each reads); the attention's matrices reshape heads: replayed whole
    assert sorted(blocks) == ["lm_head.weight", "model.embed_tokens.weight",
                              "model.layers.0.mlp.down_proj.weight",
                              "model.layers.0.mlp.gate_proj.weight",
                              "model.layers.0.mlp.up_proj.weight"]
    assert "model.layers.0.self_attn.q_proj.weight" in whole
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert blocks[name] == [(3, 32)] * 42 + [(2, 32)] and name not in whole
    assert blocks["model.layers.0.mlp.down_proj.weight"] == [(1, 64)] * 32
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        assert blocks[name] == [(1, 32)] * 64 and name not in whole
    found = model_from_spec(str(ckpt))
    want, _ = vf.coalesce(found.model, found.example, width=0.5, depth=0.5)
    _same(_weights(out), want.state_dict())


def test_a_depth_group_reads_each_block_when_its_first_op_runs_and_drops_it_after_its_last(
        tmp_path):
    """A depth group's output averages the width-mapped tensors of the blocks it groups: the
    replay reads each block's checkpoint tensor when the first op that uses it runs, and drops
    it after its last, so one checkpoint tensor is alive at a time, not the whole group's (what
    bounds the memory where an input is made rather than mapped: a converted checkpoint's fused
    experts), and the values are those of the in-memory path."""
    import weakref

    from vcyclefx.capture.recipe import recipe_of
    from vcyclefx.export.record import Recorder
    from vcyclefx.export.stream import hf_source

    model, _ = zoo.llama()
    ckpt = _checkpoint(tmp_path, model, "llama")
    src = hf_source(ckpt, str(ckpt), 2, 16, recipe_of)
    with Recorder(src.leaves) as rec:
        small, _ = vf.coalesce(src.level, width=0.5, depth=0.5, check=False)
    state = small.state_dict(keep_vars=True)
    found = model_from_spec(str(ckpt))
    want = vf.coalesce(found.model, found.example, width=0.5, depth=0.5)[0].state_dict()
    live, most, reads = [0], [0], []

    def load(names):
        got = src.reader.get(names)
        for n, t in got.items():
            reads.append(n)
            live[0] += 1
            weakref.finalize(t, lambda: live.__setitem__(0, live[0] - 1))
        most[0] = max(most[0], live[0])
        return got

    name = "model.layers.0.mlp.up_proj.weight"
    assert rec.leaves_of(state[name]) == [name, name.replace("layers.0", "layers.1")]
    value = rec.value(state[name], load)
    assert torch.equal(value, want[name])
    assert reads == rec.leaves_of(state[name]) and most[0] == 1


def test_the_reader_reads_what_safetensors_reads(tmp_path):
    """The reader gives each tensor (a view of the memory-mapped shard, which a block of rows is
    sliced from) as safetensors' own loader reads it, from shards of several tensors each."""
    from vcyclefx.export import shards

    model, _ = zoo.llama()
    ckpt = _checkpoint(tmp_path, model, "llama", shard="200KB")
    want = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as g:
            want.update({k: g.get_tensor(k) for k in g.keys()})
    assert len(want) > len(list(ckpt.glob("*.safetensors"))) > 1
    reader = shards.ShardReader(ckpt)
    got = reader.get(list(want))
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_reading_ahead_from_the_disk_writes_the_same_level(tmp_path, monkeypatch):
    """Where the checkpoint is not in the page cache, a thread reads the next outputs' inputs
    from the disk ahead of the stream (ShardReader.read_ahead); forced on here, the level is the
    same tensor for tensor, and the thread read every byte of every input once."""
    from vcyclefx.export import stream
    from vcyclefx.export.shards import ShardReader

    model, _ = zoo.llama()
    ckpt = _checkpoint(tmp_path, model, "llama")
    for f in ckpt.glob("*.safetensors"):
        f.read_bytes()  # in the page cache now
    reader = ShardReader(ckpt, "model")
    assert reader.cached_fraction() == 1.0  # mincore sees what was just read
    made, got = [], []
    monkeypatch.setattr(stream, "CACHED", 2.0)  # read ahead even from the page cache
    read_ahead = ShardReader.read_ahead
    monkeypatch.setattr(ShardReader, "read_ahead", lambda self, steps, ahead: (
        made.append(read_ahead(self, steps, ahead)), made[-1])[1])
    get = ShardReader.get
    monkeypatch.setattr(ShardReader, "get", lambda self, names: (got.extend(names),
                                                                 get(self, names))[1])
    out = tmp_path / "small"
    assert main(["coalesce", "--stream", "always", str(ckpt), "--width", "0.5", "--depth", "0.5",
                 "-o", str(out)]) == 0
    assert len(made) == 1 and made[0].waiting  # closed: the thread has ended
    entries = reader.entries
    assert made[0].read == sum(entries[n].end - entries[n].begin for n in set(got) if n in entries)
    found = model_from_spec(str(ckpt))
    want, _ = vf.coalesce(found.model, found.example, width=0.5, depth=0.5)
    _same(_weights(out), want.state_dict())


def _until(test, seconds=10.0):
    import time

    end = time.monotonic() + seconds
    while not test() and time.monotonic() < end:
        time.sleep(0.005)
    return test()


def test_reading_ahead_stays_within_its_bound_of_the_stream(tmp_path):
    """With no bytes allowed ahead, the thread reads the first output's inputs and waits; each
    step of the stream lets it read exactly the next output's inputs, each tensor once."""
    from vcyclefx.export.shards import ShardReader

    model, _ = zoo.llama()
    reader = ShardReader(_checkpoint(tmp_path, model, "llama"), "model")
    names = list(reader.entries)
    size = {n: reader.entries[n].end - reader.entries[n].begin for n in names}
    steps = [names[0:2], names[1:3], [names[3]]]  # names[1] read once
    ahead = reader.read_ahead(steps, 0)
    try:
        assert _until(lambda: ahead.waiting)
        assert ahead.read == size[names[0]] + size[names[1]]
        ahead.at(1)
        assert _until(lambda: ahead.read == sum(size[n] for n in names[:3]) and ahead.waiting)
        ahead.at(2)
        assert _until(lambda: ahead.read == sum(size[n] for n in names[:4]))
    finally:
        ahead.close()
    assert ahead.read == sum(size[n] for n in names[:4])


def test_auto_streams_a_sharded_checkpoint_and_transforms_a_small_single_file_in_memory(
        tmp_path, capsys):
    """`--stream auto` (the default) streams a sharded checkpoint of any size, as DESIGN.md
    says; the self-check it skips is named only where the in-memory path would have run it
    (float32 weights). A small single-file checkpoint is loaded and self-checked."""
    model, _ = zoo.llama()
    runs = {"bf16, sharded": _checkpoint(tmp_path, model, "bf16", torch.bfloat16),
            "f32, sharded": _checkpoint(tmp_path, model, "f32"),
            "f32, one file": _checkpoint(tmp_path, model, "one", shard="1GB")}
    assert not (runs["f32, one file"] / "model.safetensors.index.json").exists()
    said = {}
    for what, ckpt in runs.items():
        capsys.readouterr()
        assert main(["coalesce", str(ckpt), "-o", str(tmp_path / f"out {what}")]) == 0
        said[what] = capsys.readouterr().err
    streamed = {w for w, err in said.items() if "streaming its weights" in err}
    skipped = {w for w, err in said.items() if "self-check is skipped" in err}
    assert streamed == {"bf16, sharded", "f32, sharded"}
    assert skipped == {"f32, sharded"}
    # a sharded level directory streams back up by default too
    out = tmp_path / "out bf16, sharded"
    assert main(["coalesce", str(runs["bf16, sharded"]), "-o", str(tmp_path / "level"),
                 "--max-shard-size", "8KB"]) == 0
    assert (tmp_path / "level" / "weights.safetensors.index.json").is_file()
    capsys.readouterr()
    assert main(["decoalesce", str(tmp_path / "level"), "-o", str(tmp_path / "back")]) == 0
    assert "streaming its weights" in capsys.readouterr().err
    _same(_weights(tmp_path / "level"), _weights(out))


def test_auto_counts_what_a_command_writes_so_growing_a_small_level_streams(tmp_path, capsys,
                                                                           monkeypatch):
    """Under `--stream auto` a decoalesce of a small single-file level whose full-size result
    would not fit in a quarter of memory streams (it used to be judged by its input alone and
    made the whole full-size model in memory); a coalesce of the same level, which writes less
    than it reads, is still transformed in memory. The estimate of what a decoalesce writes is
    the mapping's large shapes: the written weights' size, but for the files' headers."""
    from vcyclefx.cli import build_parser
    from vcyclefx.export import stream_cmd

    model, example = zoo.llama()
    ckpt = _checkpoint(tmp_path, model, "one", shard="1GB")
    level = tmp_path / "level"
    assert main(["coalesce", str(ckpt), "-o", str(level), "--stream", "never"]) == 0
    size = stream_cmd._weight_bytes(level)
    assert not stream_cmd.sharded(level)
    monkeypatch.setattr(stream_cmd, "_memory_bytes", lambda: 4 * 2 * size)  # a quarter: 2x it

    def run(*argv) -> str:
        capsys.readouterr()
        assert main([*argv]) == 0
        return capsys.readouterr().err

    assert "streaming its weights" in run("decoalesce", str(level), "-o", str(tmp_path / "back"))
    assert "streaming its weights" not in run("coalesce", str(level), "-o", str(tmp_path / "less"),
                                             "--depth", "1")
    # (that a streamed decoalesce equals the in-memory one is the first test's)
    # the estimate: exact for a decoalesce with the mapping, an upper bound for a growth
    args = build_parser().parse_args(["decoalesce", str(level), "-o", "x"])
    written = stream_cmd._weight_bytes(tmp_path / "back")
    assert written > 4 * size
    # (file sizes, so the safetensors headers, 1.4% of this tiny model's files, make the error)
    assert abs(stream_cmd._written_bytes(args, level) - written) < 0.03 * written
    grow = build_parser().parse_args(["decoalesce", str(ckpt), "-o", "x", "--width", "2",
                                      "--depth", "2"])
    big, _ = vf.decoalesce(model, example, width=2.0, depth=2.0, check=False)
    grown = sum(t.numel() * t.element_size() for t in big.state_dict().values())  # ties twice
    assert grown > 3 * stream_cmd._weight_bytes(ckpt)
    assert stream_cmd._written_bytes(grow, ckpt) >= grown


_CONVERTED = {  # checkpoints that transformers renames or converts as it loads them
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
        vocab_size=256, max_position_embeddings=64), "embed_out.weight"),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=256, max_position_embeddings=64, num_local_experts=4,
        num_experts_per_tok=2, use_cache=False), "model.layers.0.block_sparse_moe.experts.3.w1.weight"),
}


@pytest.mark.parametrize("family", sorted(_CONVERTED))
def test_a_checkpoint_transformers_converts_as_it_loads_streams_what_from_pretrained_loads(
        tmp_path, family):
    """A checkpoint under names other than the model's (GPT-NeoX's `embed_out` is the model's
    `lm_head`) or in another form (Mixtral's experts one tensor each, fused into
    `experts.gate_up_proj` / `down_proj` by transformers' conversion mapping) streams: each of
    the model's tensors is read or made from the checkpoint's as from_pretrained makes it, and
    the streamed level equals the in-memory one tensor for tensor."""
    import transformers

    from vcyclefx.export import hfkeys
    from vcyclefx.export.shards import ShardReader

    cls, cfg, kwargs, legacy = _CONVERTED[family]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, cfg)(**kwargs))
    ckpt = _checkpoint(tmp_path, model, family, torch.bfloat16, shard="40KB")
    reader = ShardReader(ckpt)
    assert legacy in reader.entries  # the checkpoint holds the names transformers converts
    loaded = getattr(transformers, cls).from_pretrained(ckpt)
    state = loaded.state_dict()
    with torch.device("meta"):
        meta = getattr(transformers, cls)(loaded.config).to(torch.bfloat16)
    assert hfkeys.plan(meta, reader)
    made = reader.get([n for n in state if reader.name_of(n) is not None and n in reader.derived])
    assert made or family == "gpt_neox"
    for name, t in state.items():
        held = reader.name_of(name)
        assert held is not None, name
        value = made[held] if held in made else reader.get([held])[held]
        assert value.dtype == t.dtype and torch.equal(value, t), name
    outs = {}
    for mode in ("always", "never"):
        assert main(["coalesce", str(ckpt), "-o", str(tmp_path / mode), "--stream", mode]) == 0
        outs[mode] = _weights(tmp_path / mode)
    _same(outs["always"], outs["never"])


def test_auto_transforms_in_memory_a_checkpoint_whose_model_cannot_be_captured_on_meta(
        tmp_path, capsys, monkeypatch):
    """`--stream auto` on a sharded checkpoint that fits in memory, whose model fails to capture
    on the meta device (injected here: GPT-J, which failed so once, now streams): the command says so
    and transforms it in memory, writing what `--stream never` writes; `--stream always` stops
    with the capture error and writes nothing."""
    from vcyclefx.errors import CaptureError
    from vcyclefx.export import stream_cmd

    model, _ = zoo.llama()
    ckpt = _checkpoint(tmp_path, model, "llama")

    def fails(*args, **kwargs):
        raise CaptureError("front-end 'export' failed: Tensor on device cpu is not on the "
                           "expected device meta!\nFix: ...")

    monkeypatch.setattr(stream_cmd, "hf_source", fails)
    capsys.readouterr()
    assert main(["coalesce", str(ckpt), "-o", str(tmp_path / "auto")]) == 0
    err = capsys.readouterr().err
    assert "could not be captured on the meta device" in err and "expected device meta" in err
    assert "self-check is skipped" not in err  # the in-memory path runs it
    assert main(["coalesce", str(ckpt), "-o", str(tmp_path / "never"), "--stream", "never"]) == 0
    _same(_weights(tmp_path / "auto"), _weights(tmp_path / "never"))
    assert main(["coalesce", str(ckpt), "-o", str(tmp_path / "always"), "--stream", "always"]) == 2
    assert "expected device meta" in capsys.readouterr().err
    assert not (tmp_path / "always").exists()
    assert main(["inspect", str(ckpt)]) == 0  # inspect falls back the same way
    assert "could not be captured on the meta device" in capsys.readouterr().err


_FAMILIES = {  # causal LMs whose streamed coalesce (and decoalesce) equal the in-memory ones
    "MistralForCausalLM": {}, "Qwen2ForCausalLM": {}, "Qwen3ForCausalLM": {"head_dim": 16},
    "Phi3ForCausalLM": {"pad_token_id": 0}, "Olmo2ForCausalLM": {}, "GraniteForCausalLM": {},
    "CohereForCausalLM": {}, "Gemma2ForCausalLM": {"head_dim": 16},
    "Qwen3MoeForCausalLM": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                            "moe_intermediate_size": 32, "num_key_value_heads": 4},
    "OlmoeForCausalLM": {"num_experts": 4, "num_experts_per_tok": 2, "num_key_value_heads": 4},
}


@pytest.mark.slow
@pytest.mark.parametrize("cls", sorted(_FAMILIES))
def test_streamed_coalesce_equals_the_in_memory_one_across_families(tmp_path, cls, monkeypatch):
    """Sharded bf16 checkpoints of other families (MoE ones through transformers' conversion
    mapping): the streamed coalesce writes what the in-memory one writes, tensor for tensor, and
    so does the streamed decoalesce of its level; every output that can be made a block of rows
    at a time is (1000-byte blocks), and at least one is."""
    import transformers

    from vcyclefx.export import shards, stream

    monkeypatch.setattr(stream, "ROW_BLOCK_BYTES", 1000)
    by_rows, write_rows = [], shards.ShardWriter.write_rows
    monkeypatch.setattr(shards.ShardWriter, "write_rows",
                        lambda self, name, parts: (by_rows.append(name),
                                                   write_rows(self, name, parts))[1])

    model_cls = getattr(transformers, cls)
    config = model_cls.config_class(
        **{**dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, vocab_size=256,
                  max_position_embeddings=64, use_cache=False), **_FAMILIES[cls]})
    torch.manual_seed(0)
    ckpt = _checkpoint(tmp_path, model_cls(config), "ckpt", torch.bfloat16, shard="40KB")
    for mode in ("always", "never"):
        assert main(["coalesce", str(ckpt), "-o", str(tmp_path / mode), "--stream", mode]) == 0
    _same(_weights(tmp_path / "always"), _weights(tmp_path / "never"))
    assert by_rows
    for mode in ("always", "never"):
        assert main(["decoalesce", str(tmp_path / "always"), "-o", str(tmp_path / f"big-{mode}"),
                     "--stream", mode]) == 0
    _same(_weights(tmp_path / "big-always"), _weights(tmp_path / "big-never"))

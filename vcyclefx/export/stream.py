"""Checkpoints larger than memory: coalesce / decoalesce / interpolate by streaming.

For a Hugging Face directory of safetensors (one file or shards with
``model.safetensors.index.json``) or a level directory, the command line:

1. builds the model on the meta device (parameters and persistent buffers are meta tensors; the
   non-persistent buffers a class computes in ``__init__``, such as rotary frequencies, are real
   and small) in the checkpoint's dtype, and checks every tensor's dtype and shape against the
   shards' headers before any value is read;
2. captures and plans there (``torch.export`` traces with fake tensors anyway) and runs the
   transform under a :class:`~vcyclefx.export.record.Recorder`; where the blocks are identical,
   only two periods of them are traced and repeated (:mod:`vcyclefx.capture.repeat`);
3. writes the level directory with the weights as sharded safetensors
   (:class:`~vcyclefx.export.shards.ShardWriter`), each output tensor replayed from the few
   input tensors it needs, each read memory-mapped when the first op that uses it runs
   (:class:`~vcyclefx.export.shards.ShardReader`);
   a large output whose every row comes from one row of each of its inputs (the width map of an
   embedding or LM head: row i from row i; of an MLP matrix: rows i and i + half; the depth
   mean of those) is replayed and written a block of rows at a time, so neither its inputs nor
   itself is held whole; a worker thread writes each tensor (or block) while the next one is
   made.

Nothing holds the whole input or the whole output. Results are bit-identical to the in-memory
path (the same ops run on the same values). The output directory is written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vcyclefx.errors import CheckpointError
from vcyclefx.export.record import Recorder
from vcyclefx.export.shards import ShardReader, ShardWriter, nbytes, parse_bytes
from vcyclefx.fx.device import (literals_for_meta_weights, meta_as_fake_cpu,
                                 move_device_literals_)
from vcyclefx.level import put_state

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


def streamable(path) -> bool:
    """A Hugging Face directory with safetensors weights, or a level directory."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / "level.json").is_file():
        return True
    return (p / "config.json").is_file() and (
        (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file())


@dataclass
class Source:
    level: torch.fx.GraphModule  # parameters and persistent buffers on the meta device
    reader: ShardReader
    leaves: dict  # meta tensor -> the checkpoint name it is read from
    mapping: object = None  # a level directory's mapping.json
    directory: Path | None = None
    cached: bool = False  # the capture came from the capture cache


def _checkpoint_dtype(cfg, reader: ShardReader) -> torch.dtype:
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    floats = [e.dtype for e in reader.entries.values() if e.dtype.is_floating_point]
    return floats[0] if floats else torch.float32


def _bind(level, reader: ShardReader, where: str, dtype_of=None) -> dict:
    """``level``'s (or a model's) parameters and persistent buffers replaced by meta tensors
    (ties kept) of the dtype and shape the checkpoint's header gives, each checked against the
    module's own (``dtype_of``: the dtype expected); returns {meta tensor: checkpoint name}."""
    state = level.state_dict(keep_vars=True)
    names_of: dict[int, list[str]] = {}
    for name, t in state.items():
        names_of.setdefault(id(t), []).append(name)
    leaves, done = {}, {}
    for name, t in state.items():
        if id(t) in done:
            new = done[id(t)]
        else:
            held = next((reader.name_of(n) for n in names_of[id(t)] if reader.name_of(n)), None)
            if held is None:
                raise CheckpointError(f"{reader.directory}: no shard holds tensor {name} "
                                      f"({list(t.shape)} {t.dtype}), which {where} needs")
            e = reader.header(held)
            want = dtype_of(t) if dtype_of else t.dtype
            if e.shape != tuple(t.shape) or (t.dtype.is_floating_point and e.dtype != want):
                raise CheckpointError(
                    f"{e.file or reader.directory}: tensor {held} is {e.dtype} {list(e.shape)} "
                    f"but {where} has it "
                    f"as {want} {list(t.shape)}; the shard and config.json are from different "
                    "checkpoints")
            meta = torch.empty(e.shape, dtype=e.dtype, device="meta")
            new = torch.nn.Parameter(meta, t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
            done[id(t)] = new
            leaves[new] = held
        put_state(level, name, new)
    return leaves


def _extras(level):
    """(module, attribute, tensor) of each tensor outside the state dict: non-persistent
    buffers and lifted constants."""
    state = {id(t) for t in level.state_dict(keep_vars=True).values()}
    for mod in level.modules():
        named = list(mod._buffers.items()) + [(k, v) for k, v in vars(mod).items()
                                              if isinstance(v, torch.Tensor)]
        for leaf, t in named:
            if t is not None and id(t) not in state:
                yield mod, leaf, t


def _put(mod, leaf: str, t: torch.Tensor) -> None:
    if leaf in mod._buffers:
        mod._buffers[leaf] = t
    else:
        object.__setattr__(mod, leaf, t)


def _hold_extras(level, reader: ShardReader) -> dict:
    """The level's tensors outside its state dict replaced by meta tensors, their values held by
    ``reader`` (under ``@`` names): a level directory's graph then runs the transform on meta
    tensors only, like a capture on the meta device. Returns {meta tensor: name}."""
    leaves, done = {}, {}
    for i, (mod, leaf, t) in enumerate(list(_extras(level))):
        if t.is_meta:
            continue
        if id(t) not in done:
            name = f"@{i}.{leaf}"
            reader.held[name] = t
            done[id(t)] = torch.empty_like(t, device="meta")
            leaves[done[id(t)]] = name
        _put(mod, leaf, done[id(t)])
    return leaves


def materialize_extras(level, recorder: Recorder, load) -> None:
    """The result's meta tensors outside its state dict (small: rotary tables, constants), made
    real (replayed) in place, so that ``level.pt2`` holds their values."""
    made = {}
    for mod, leaf, t in list(_extras(level)):
        if t.is_meta:
            if id(t) not in made:
                made[id(t)] = recorder.value(t, load)
            _put(mod, leaf, made[id(t)])


def hf_source(directory, spec: str, batch: int, seq: int, recipe_of_model,
              repeat: bool = True) -> Source:
    """A Hugging Face checkpoint directory as a meta-device level (see the module docstring).

    ``repeat``: where the model's blocks are identical, capture two periods of them and repeat
    them (:mod:`vcyclefx.capture.repeat`; the same graph in a fraction of the time); False
    traces every block. A capture made before of a checkpoint with the same config, tensor
    headers and options is loaded from the capture cache (:mod:`vcyclefx.capture.cache`)."""
    from vcyclefx.capture import cache

    d = Path(directory)
    reader = ShardReader(d, "model")
    key = cache.key_of(d, reader, {"batch": batch, "seq": seq, "repeat": bool(repeat)})
    entry = cache.load(key)
    if entry is not None:
        try:
            level = _cached_level(entry, d)
            leaves = _bind(level, reader, f"the cached capture of {d / 'config.json'}",
                           dtype_of=lambda t: entry.dtype) if level is not None else None
        except Exception as e:  # noqa: BLE001 - the key holds every header: the entry is wrong
            cache.discard(key, f"{type(e).__name__}: {e}")
            leaves = None
        if leaves is not None:
            return Source(level, reader, leaves, directory=d, cached=True)
    level, leaves, pending, growth = _captured(d, spec, reader, batch, seq, recipe_of_model,
                                               repeat, key is not None and cache.root() is not None)
    cache.store(key, pending, growth, source=d.resolve())
    return Source(level, reader, leaves, directory=d)


def _cached_level(entry, d: Path):
    """The level of a cache entry, grown where it was captured by repetition (None: the depth
    pass no longer grows it; the model is then captured again). Its recipe names ``d`` as the
    config's source, as a capture of ``d`` does (the entry may come from another folder)."""
    import dataclasses

    from passes.contract import verify
    from vcyclefx.capture.repeat import grow, in_model_order
    from vcyclefx.level import KEY, level_info

    # the entry holds a CPU program (leveldir._graph_program) whose weights are meta tensors
    literals_for_meta_weights(entry.level)
    info = level_info(entry.level)
    if info.recipe is not None and "_name_or_path" in info.recipe.args:
        recipe = dataclasses.replace(info.recipe, args={**info.recipe.args, "_name_or_path": str(d)})
        entry.level.meta[KEY] = dataclasses.replace(info, recipe=recipe)
    if entry.growth is None:
        return entry.level
    grown, _ = grow(entry.level, entry.growth)
    if grown is None:
        return None
    verify(grown, what="the cached capture grown by repetition")
    return in_model_order(grown, entry.growth)


def _captured(d: Path, spec: str, reader: ShardReader, batch: int, seq: int, recipe_of_model,
              repeat: bool, keep: bool):
    """(the level, its tensors bound to the checkpoint's ({meta tensor: name}), what the cache
    would keep of it or None, its Growth or None): the model built on the meta device and
    captured, by repetition where ``repeat`` and its blocks allow. ``keep``: serialise the
    captured level for the cache."""
    import transformers

    from vcyclefx.capture import cache
    from vcyclefx.capture.frontend import capture
    from vcyclefx.capture.repeat import params_on_meta, repeated_capture
    from vcyclefx.capture.specs import hf_example, hf_class
    from vcyclefx.export import hfkeys

    cfg, cls = hf_class(d, spec)
    dtype = _checkpoint_dtype(cfg, reader)
    transformers.logging.set_verbosity_error()

    def build(config):
        with params_on_meta(dtype):
            m = cls(config)
        return m.eval()

    model = build(cfg)
    # the model's names that transformers' conversion mapping makes from the checkpoint's
    # (renamed keys, fused experts): such a capture is not cached, since a cached capture is
    # bound to the checkpoint without the model that the conversions need
    if hfkeys.plan(model, reader):
        keep = False
    # checked against the shards before the capture: a checkpoint that does not fit its config
    # fails in seconds; the level takes these very tensors (copy_weights=False)
    leaves = _bind(model, reader, f"{cls.__name__} of {d / 'config.json'}",
                   dtype_of=lambda t: dtype)
    recipe = recipe_of_model(model)
    kept: list = []

    def capture_one(m):
        # traced with fake CPU weights: the branches and strides of a CPU trace (fx.device);
        # then transformed on the meta weights, its device literals follow them
        with meta_as_fake_cpu(m) as restore:
            level = capture(m, hf_example(m, spec, batch, seq), copy_weights=False, recipe=recipe)
            restore(level)
        literals_for_meta_weights(level)
        if keep:  # serialised before the growth and the binding change anything
            kept[:] = [cache.Pending(level, dtype)]
        return level

    growths: list = []
    level = repeated_capture(model, build, capture_one,
                             captured=lambda _, g: growths.append(g)) if repeat else None
    if level is None:
        level = capture_one(model)
    return level, leaves, (kept[0] if kept else None), (growths[0] if growths else None)


def level_source(directory) -> Source:
    """A level directory as a meta-device level: the graph from ``level.pt2``, the weights read
    from its (sharded) safetensors."""
    from vcyclefx.export.leveldir import graph_of_level, tie
    from vcyclefx.store import ALIASES_KEY

    d = Path(directory)
    level, mapping = graph_of_level(d)
    reader = ShardReader(d, "weights")
    aliases = json.loads(reader.metadata.get(ALIASES_KEY) or "{}") or \
        json.loads((d / "level.json").read_text()).get("aliases") or {}
    for alias, name in aliases.items():
        tie(level, alias, name)  # one tensor under both names, as load_level ties them
    leaves = _bind(level, reader, f"the graph of {d / 'level.pt2'}")
    leaves.update(_hold_extras(level, reader))
    move_device_literals_(level, torch.device("meta"))  # every tensor is a meta tensor now
    return Source(level, reader, leaves, mapping=mapping, directory=d)


def stream_weights(level, recorder, reader: ShardReader, max_shard_size, produce=None):
    """A ``weights=`` writer for ``save_level``: writes the level's tensors as sharded
    safetensors, each made when it is written (``produce(name, meta tensor)`` where given, else
    replayed by ``recorder``)."""
    from vcyclefx.store import ALIASES_KEY, aliases_of

    state = level.state_dict(keep_vars=True)
    aliases = aliases_of(state)
    layout = [(n, t.dtype, tuple(t.shape)) for n, t in state.items() if n not in aliases]

    def load(names):
        got = reader.get(names)
        load.bytes += sum(_bytes(t) for t in got.values())
        return got

    load.bytes = 0

    def write(tmp: Path) -> None:
        import sys
        import time

        start, cpu = time.perf_counter(), time.process_time()
        writer = ShardWriter(tmp, "weights", layout, parse_bytes(max_shard_size),
                             {ALIASES_KEY: json.dumps(aliases)}, background=True)
        ahead = None
        try:
            # read ahead only from the disk: asking for pages already cached costs CPU in the
            # page faults that follow (measured: +20% on a checkpoint in the page cache)
            cached = reader.cached_fraction() if produce is None else 1.0
            if cached is None or cached < CACHED:
                ahead = reader.read_ahead([recorder.leaves_of(state[n]) if state[n].is_meta
                                           else [] for n, *_ in layout], READ_AHEAD_BYTES)
            for k, (name, *_) in enumerate(tqdm(layout, desc="writing weights", unit="tensor",
                                                leave=False, disable=None)):
                t = state[name]
                if ahead is not None:
                    ahead.at(k)  # the disk reads later outputs' inputs while this is made
                if produce is not None:
                    value = produce(name, t)
                elif t.is_meta:
                    value = _replay(recorder, t, reader, load)
                else:
                    value = t
                if isinstance(value, torch.Tensor):
                    writer.write(name, value.detach())
                else:  # blocks of rows, each written as it is made
                    writer.write_rows(name, value)
                del value  # the writer's thread holds it until written, no longer
            writer.finish(aliases)
        finally:
            if ahead is not None:
                ahead.close()
            writer.abort()
        written = sum(_bytes(t) for n, t in state.items() if n not in aliases)
        print(f"vcyclefx: streamed {len(layout)} tensors ({load.bytes / 1e9:.3f} GB read, "
              f"{written / 1e9:.3f} GB written) in {time.perf_counter() - start:.2f} s "
              f"({time.process_time() - cpu:.2f} s of CPU)",
              file=sys.stderr, flush=True)

    return write


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


READ_AHEAD_BYTES = 256 << 20  # how far ahead of the stream the disk reads (ShardReader.read_ahead)
CACHED = 0.9  # ... unless this much of the checkpoint is in the page cache already
ROW_BLOCK_BYTES = 16 << 20  # a block of a large output's rows reads this much of its inputs


def _replay(recorder, t: torch.Tensor, reader: ShardReader, load):
    """Output ``t`` replayed: a tensor, or, for one whose inputs exceed :data:`ROW_BLOCK_BYTES`
    and whose rows can be made a block at a time (:meth:`Recorder.tiling`: an embedding's width
    map, row i from row i; a matrix's, whose rows pair rows of the two halves of its inputs; a
    depth group's mean of those), an iterator of blocks of its rows, made as they are written,
    so that neither its inputs nor itself is ever held whole."""
    names = recorder.leaves_of(t)
    if t.dim() == 0 or not names or any(reader.entries.get(n) is None for n in names):
        return recorder.value(t, load)  # (a tensor a converter makes is made whole)
    if sum(nbytes(reader.entries[n].dtype, reader.entries[n].shape) for n in names) \
            <= ROW_BLOCK_BYTES:
        return recorder.value(t, load)
    ran = recorder.tiling(t)
    if ran is None:
        return recorder.value(t, load)
    # what one row of the output reads: a row of each checkpoint tensor, once per offset
    per_row = sum(nbytes(reader.entries[name].dtype, reader.entries[name].shape[1:]) * len(at)
                  for name, at in recorder.leaf_offsets(ran).items())

    def rows(name, begin, end):
        # a view of those rows of the memory-mapped tensor: only their pages are read, and
        # they stay mapped only while the block uses them
        got = reader.get([name])[name][begin:end]
        load.bytes += _bytes(got)
        return got

    return recorder.tiles_of(t, ran, rows, max(1, ROW_BLOCK_BYTES // max(per_row, 1)))


def interpolated(a: Source, b: Source, alpha: float):
    """``produce`` for :func:`stream_weights`: ``(1 - alpha) * a + alpha * b`` per tensor,
    as ``vf.interpolate`` mixes them."""
    from vcyclefx.api import mix

    names_a = {id(t): n for t, n in a.leaves.items()}
    state_b = b.level.state_dict(keep_vars=True)
    for name, t in a.level.state_dict(keep_vars=True).items():
        if name not in state_b or tuple(state_b[name].shape) != tuple(t.shape):
            raise CheckpointError(f"interpolate: tensor {name} is {list(t.shape)} in "
                                  f"{a.directory} but "
                                  f"{list(state_b[name].shape) if name in state_b else 'absent'} "
                                  f"in {b.directory}")
    names_b = {id(t): n for t, n in b.leaves.items()}

    def produce(name, t):
        ta = a.reader.get([names_a[id(t)]])[names_a[id(t)]]
        nb = names_b[id(state_b[name])]
        return mix(ta, b.reader.get([nb])[nb], alpha)

    return produce


__all__ = ["streamable", "hf_source", "level_source", "stream_weights", "interpolated", "Source",
           "materialize_extras"]

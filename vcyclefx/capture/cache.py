"""A cache of the captures of Hugging Face checkpoint directories, for the streaming command line.

A capture of a checkpoint on the meta device (:func:`vcyclefx.export.stream.hf_source`) depends
on the checkpoint's ``config.json`` and the names, dtypes and shapes of its tensors, not on their
values; it costs the import of the model's modeling code (2-3 s of transformers) and a
``torch.export`` trace. Both are paid once: the captured level's graph (the two-period level
before it is grown, where the model was captured by repetition) is kept in the cache, and a later
command on a checkpoint with the same key loads it (without importing the modeling code),
grows it and binds the checkpoint's tensors to it, as ``torch.compile`` keeps its compiled
graphs.

The key covers everything the graph depends on: ``config.json`` byte for byte, every tensor's
name, dtype and shape (the shards' headers), the capture options (example batch and sequence,
``--whole-capture``), and the versions of Python, torch, transformers and vcyclefx (a digest of
vcyclefx's and the passes' source files). A ``config.json`` with ``auto_map`` (code from the
checkpoint's folder, which can change under the same config) and an editable install of
transformers (its code can change under the same version) are never cached.

Where: ``$VCYCLEFX_CAPTURE_CACHE`` where it names a folder; ``off`` (or ``0``, ``no``,
``false``) turns the cache off; unset, the folder ``captures`` of vcyclefx's cache
(``$VCYCLEFX_CACHE``, default ``~/.cache/vcyclefx``, where the driver keeps its tokenised
corpora). An entry that cannot be read is removed and the model captured again; a cache that
cannot be written is reported and the command goes on. The most recently used
:data:`MAX_ENTRIES` entries are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ENV = "VCYCLEFX_CAPTURE_CACHE"  # a folder, or off
FORMAT = 2  # of an entry; part of the key
MAX_ENTRIES = 64
_OFF = {"0", "off", "no", "false"}
_LEVEL, _INPUTS, _ENTRY = "level.pt2", "inputs.safetensors", "entry.json"


def _progress(msg: str) -> None:
    print(f"vcyclefx: {msg}", file=sys.stderr, flush=True)


def root() -> Path | None:
    """The cache's folder, or None where ``VCYCLEFX_CAPTURE_CACHE`` turns it off."""
    from vcyclefx.store import cache_root

    value = os.environ.get(ENV, "").strip()
    if value.lower() in _OFF:
        return None
    return Path(value) if value else cache_root() / "captures"


_SOURCES: list[str] = []  # the digest of vcyclefx's sources, once per process


def _sources_digest() -> str:
    if not _SOURCES:
        import passes
        import vcyclefx

        h = hashlib.sha256()
        for pkg in (vcyclefx, passes):
            top = Path(pkg.__file__).parent
            for f in sorted(top.rglob("*.py")):
                h.update(str(f.relative_to(top.parent)).encode() + b"\0" + f.read_bytes() + b"\0")
        _SOURCES.append(h.hexdigest())
    return _SOURCES[0]


def _transformers_version() -> str | None:
    """transformers' version, or None where its code can change under it (an editable
    install) or it is not installed."""
    import importlib.metadata as md

    try:
        dist = md.distribution("transformers")
    except md.PackageNotFoundError:
        return None
    direct = dist.read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        return None
    return dist.version


def key_of(directory, reader, options: dict) -> str | None:
    """The cache key of capturing the checkpoint ``directory`` (its tensors' headers in
    ``reader``) with ``options``, or None where it must not be cached (``auto_map``, an
    editable transformers, a ``config.json`` that is not a JSON object: the capture reports
    that)."""
    try:
        raw = (Path(directory) / "config.json").read_bytes()
        config = json.loads(raw)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or "auto_map" in config:
        return None
    transformers = _transformers_version()
    if transformers is None:
        return None
    material = {
        "format": FORMAT,
        "config": hashlib.sha256(raw).hexdigest(),
        "tensors": sorted([name, str(e.dtype), list(e.shape)] for name, e in reader.entries.items()),
        "options": options,
        "python": list(sys.version_info[:2]),
        "torch": [torch.__version__, getattr(torch.version, "git_version", "")],
        "transformers": transformers,
        "vcyclefx": _sources_digest(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:40]


@dataclass
class Entry:
    level: torch.fx.GraphModule  # the captured level, meta tensors, before it is grown
    growth: object  # vcyclefx.capture.repeat.Growth, or None (captured whole)
    dtype: torch.dtype  # the checkpoint's dtype, as the capture took it


def load(key: str | None) -> Entry | None:
    """The entry of ``key``, or None (not cached, the cache off, or an entry that cannot be
    read: removed, so that this capture replaces it)."""
    base = root()
    if key is None or base is None:
        return None
    d = base / key
    if not (d / _ENTRY).is_file():
        return None
    try:
        entry = _read(d)
    except Exception as e:  # noqa: BLE001 - any damage: capture anew
        discard(key, f"{type(e).__name__}: {e}")
        return None
    with contextlib.suppress(OSError):
        os.utime(d)  # most recently used
    return entry


def discard(key: str, why: str) -> None:
    """Remove the entry of ``key`` (it cannot be read or does not fit its checkpoint), saying
    so: the caller captures the model again, and that capture replaces it."""
    d = root() / key
    _progress(f"the capture cache entry {d} cannot be read ({why}); capturing the model again")
    shutil.rmtree(d, ignore_errors=True)


def _read(d: Path) -> Entry:
    from vcyclefx.capture.repeat import Growth
    from vcyclefx.export.leveldir import info_of, load_pt2, module_of, tie
    from vcyclefx.level import make_level
    from vcyclefx.store import load_tensors

    meta = json.loads((d / _ENTRY).read_text())
    if meta.get("entry_format") != FORMAT:
        raise ValueError(f"entry format {meta.get('entry_format')!r}, expected {FORMAT}")
    gm = module_of(load_pt2(d / _LEVEL, source_class=meta["source_class"]))
    level = make_level(gm, info_of(load_tensors(d / _INPUTS), meta), training=meta["training"])
    for alias, name in meta["aliases"].items():
        tie(level, alias, name)
    growth = Growth.from_json(meta["growth"]) if meta["growth"] is not None else None
    return Entry(level, growth, getattr(torch, meta["dtype"]))


class Pending:
    """What :func:`store` writes, serialised at once (``level`` is grown and bound after)."""

    def __init__(self, level, dtype: torch.dtype):
        import io

        from vcyclefx.export.leveldir import _inputs_state, _summary, save_program
        from vcyclefx.level import level_info
        from vcyclefx.store import aliases_of, tensors_to_bytes

        info = level_info(level)
        state = level.state_dict(keep_vars=True)
        buf = io.BytesIO()
        save_program(level, buf)
        self.pt2 = buf.getvalue()
        self.inputs = tensors_to_bytes(_inputs_state(info))
        # the level summary a level directory has (what info_of reads back), and the entry's own
        self.meta = {**_summary(level, info, state, None), "entry_format": FORMAT,
                     "aliases": aliases_of(state), "dtype": str(dtype).removeprefix("torch."),
                     "growth": None}


def store(key: str | None, pending: Pending | None, growth=None, source: str = "") -> None:
    """Write ``pending`` (with its :class:`~vcyclefx.capture.repeat.Growth`, None for a whole
    capture) as the entry of ``key``; a cache that cannot be written is reported, not raised."""
    base = root()
    if key is None or pending is None or base is None:
        return
    meta = {**pending.meta, "growth": growth.to_json() if growth is not None else None,
            "source": str(source), "created": time.time()}
    tmp = None
    try:
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{key}.tmp-"))
        (tmp / _LEVEL).write_bytes(pending.pt2)
        (tmp / _INPUTS).write_bytes(pending.inputs)
        (tmp / _ENTRY).write_text(json.dumps(meta, indent=1))  # last: an entry is complete
        try:
            os.rename(tmp, base / key)
        except OSError:  # another process wrote it meanwhile: theirs is as good
            pass
        _evict(base)
    except OSError as e:
        _progress(f"the capture cache {base} cannot be written ({e}); the next command will "
                  f"capture this model again ({ENV}=FOLDER moves the cache, {ENV}=off turns "
                  "it off)")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _evict(base: Path) -> None:
    """Keep the :data:`MAX_ENTRIES` most recently used entries (and remove what a process that
    died while writing one left, after an hour)."""
    entries = []
    now = time.time()
    for d in base.iterdir():
        with contextlib.suppress(OSError):
            if not d.name.startswith("."):
                entries.append((d.stat().st_mtime, d))
            elif ".tmp-" in d.name and now - d.stat().st_mtime > 3600:
                shutil.rmtree(d, ignore_errors=True)
    for _, d in sorted(entries, reverse=True)[MAX_ENTRIES:]:
        shutil.rmtree(d, ignore_errors=True)


__all__ = ["ENV", "Entry", "Pending", "discard", "key_of", "load", "root", "store", "MAX_ENTRIES"]

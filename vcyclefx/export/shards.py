"""Sharded safetensors, one tensor at a time: a lazy reader and a streaming writer.

Two small pieces (after mergekit's lazy loader and tensor writer), for checkpoints larger than
memory:

- :class:`ShardReader` maps each tensor name of a checkpoint (one ``*.safetensors`` file, or the
  shards an ``*.safetensors.index.json`` lists) to its shard, from the shards' headers alone, and
  reads a tensor on demand through safetensors' memory-mapped ``safe_open`` (a view of the
  mapping, which lives as long as the tensor, and only the pages its ops touch are read: a block
  of its rows is a slice of it). Every shard is checked when the reader is made: it exists, it
  holds what the index says, each tensor's byte range matches its dtype and shape and lies
  within the file; each failure is a :class:`~vcyclefx.errors.CheckpointError` naming the file
  and tensor.
- :class:`ShardWriter` lays out the output shards before any value exists (every name, dtype and
  shape is known from the level captured on the meta device), writes each shard's header first
  and then each tensor's bytes as the tensor is made, so a shard is complete as soon as its last
  tensor is written and nothing holds more than one tensor (two with ``background=True``: one
  being written by the worker thread, one being made). The index is written at the end.

The byte format is safetensors' own (8-byte little-endian header length, JSON header, data):
what the writer writes, safetensors' own loaders read.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from vcyclefx.errors import CheckpointError

# safetensors dtype names <-> torch dtypes
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
DEFAULT_MAX_SHARD = "50GB"  # save_pretrained's default
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)


def parse_bytes(text) -> int:
    """``"5GB"`` / ``"300MB"`` / ``"2GiB"`` / an int -> bytes (decimal units as in
    ``save_pretrained``, binary ones with ``i``)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise CheckpointError(f"--max-shard-size {text!r} is not a size (write e.g. 5GB or 300MB)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base ** power)


@dataclass(frozen=True)
class Entry:
    """Where a tensor lies: its shard, dtype, shape and byte range in the shard's data."""
    file: Path
    dtype: torch.dtype
    shape: tuple
    begin: int
    end: int


def read_header(path: Path) -> tuple[dict, dict, int]:
    """(tensor entries, metadata, data start) of a safetensors file; CheckpointError if the file
    is missing, not safetensors, or shorter than its header says (truncated)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise CheckpointError(f"{path}: not a safetensors file or truncated (header of "
                                      f"{n} bytes in a file of {size}); copy the shard again")
            header = json.loads(f.read(n))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing shard; copy it into the checkpoint directory") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read its safetensors header ({e})") from e
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    entries = {}
    for name, h in header.items():
        dtype = DTYPES.get(h.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has dtype {h.get('dtype')!r}, which "
                                  "vcyclefx does not read")
        b, e = h["data_offsets"]
        if e - b != nbytes(dtype, h["shape"]) or b < 0:
            raise CheckpointError(f"{path}: tensor {name} is {h.get('dtype')} {h['shape']} but "
                                  f"its header gives it bytes {b}:{e}; the shard is damaged, "
                                  "copy it again")
        if start + e > size:
            raise CheckpointError(f"{path}: truncated: tensor {name} needs bytes up to "
                                  f"{start + e} but the file has {size}; copy the shard again")
        entries[name] = Entry(path, dtype, tuple(h["shape"]), b, e)
    return entries, meta, start


def _index_of(directory: Path, stem: str) -> Path | None:
    p = directory / f"{stem}.safetensors.index.json"
    return p if p.is_file() else None


def _cached_pages(path: Path) -> tuple[int, int] | None:
    """(pages, pages in the page cache) of file ``path``, from ``mincore`` on a mapping of it;
    None where libc cannot be called."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        size = os.path.getsize(path)
        if size == 0:
            return 0, 0
        fd = os.open(path, os.O_RDONLY)
    except (OSError, AttributeError, TypeError):
        return None
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * n)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            flags = bytes(vec)
            return n, n - flags.count(0)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


class ShardReader:
    """The tensors of one checkpoint (``stem``: ``model`` for Hugging Face, ``weights`` for a
    level directory), by name, read one at a time."""

    def __init__(self, directory, stem: str = "model"):
        d = Path(directory)
        self.directory = d
        self.held: dict[str, torch.Tensor] = {}  # small tensors kept in memory ("@" names)
        # the model's names its checkpoint holds under another name, or makes from several of
        # its tensors (vcyclefx.export.hfkeys: transformers' conversion mapping)
        self.renamed: dict[str, str] = {}
        self.derived: dict = {}
        index = _index_of(d, stem)
        self.entries: dict[str, Entry] = {}
        self.metadata: dict = {}
        self._starts: dict[Path, int] = {}  # shard -> where its data begins
        if index is not None:
            try:
                spec = json.loads(index.read_text())
                weight_map = spec["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
            self.metadata = spec.get("metadata") or {}
            files: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                files.setdefault(file, []).append(name)
            for file, names in files.items():
                path = d / file
                if not path.is_file():
                    raise CheckpointError(f"{path}: missing shard (the index {index.name} puts "
                                          f"tensor {names[0]} in it); copy it into {d}")
                entries, meta, self._starts[path] = read_header(path)
                for name in names:
                    if name not in entries:
                        raise CheckpointError(f"{index}: names tensor {name} in {file}, which does "
                                              "not hold it; the index and the shards are from "
                                              "different checkpoints")
                    self.entries[name] = entries[name]
                self.metadata = {**meta, **self.metadata}
        else:
            path = d / f"{stem}.safetensors"
            if not path.is_file():
                raise CheckpointError(f"{d}: no {stem}.safetensors and no "
                                      f"{stem}.safetensors.index.json")
            self.entries, self.metadata, self._starts[path] = read_header(path)

    def __contains__(self, name: str) -> bool:
        return name in self.entries or name in self.derived

    def name_of(self, name: str) -> str | None:
        """The name this reader reads a model tensor ``name`` under (its checkpoint name where it
        was renamed), None where it cannot make it."""
        name = self.renamed.get(name, name)
        return name if name in self.entries or name in self.derived else None

    def header(self, name: str) -> Entry:
        """Where tensor ``name`` lies; a tensor made from others (``derived``) lies nowhere
        (``file`` None) but has its dtype and shape."""
        if name in self.derived:
            d = self.derived[name]
            return Entry(None, d.dtype, d.shape, 0, 0)
        return self.entries[name]

    def get(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, each shard opened (memory-mapped) once for the call: a tensor
        is a view of the mapping (no copy; its pages are read as its ops touch them) and keeps
        the mapping alive until it is dropped."""
        from safetensors import safe_open

        out = {n: self.held[n] for n in names if n in self.held}
        for n in names:
            if n in self.derived:
                out[n] = self.derived[n].make(self.get)
        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.held and n not in self.derived:
                by_file.setdefault(self.entries[n].file, []).append(n)
        for file, ns in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as f:
                    for n in ns:
                        out[n] = f.get_tensor(n)
            except Exception as e:  # noqa: BLE001 - safetensors' own errors name no tensor
                raise CheckpointError(f"{file}: cannot read tensor {ns[0]} ({e})") from e
        return out

    def cached_fraction(self) -> float | None:
        """The fraction of the shards' pages in the page cache (``mincore``), None where it
        cannot be told (not POSIX, no libc)."""
        pages = cached = 0
        for path in self._starts:
            got = _cached_pages(path)
            if got is None:
                return None
            pages, cached = pages + got[0], cached + got[1]
        return cached / pages if pages else 1.0

    def read_ahead(self, steps: list[list[str]], ahead: int) -> "ReadAhead":
        """A :class:`ReadAhead` over this checkpoint: ``steps[k]`` are the tensors the ``k``-th
        output reads."""
        return ReadAhead(self, steps, ahead)


class ReadAhead:
    """A thread that reads from the disk, in the order a stream asks for them, the bytes of the
    tensors its next outputs need, at most ``ahead`` bytes beyond the output being made, so that
    they are in the page cache when :meth:`ShardReader.get` maps them: the disk works while the
    CPU makes the outputs before (a blocking read releases the GIL). The bytes land in a scratch
    buffer and are dropped; ``ahead`` bounds what this adds to the page cache, so a checkpoint
    larger than memory evicts nothing the stream still needs. A failed read ends the thread
    quietly: the stream's own read of that tensor names the file.

    Call :meth:`at` as each output ``k`` is started, :meth:`close` at the end."""

    CHUNK = 4 << 20

    def __init__(self, reader: ShardReader, steps: list[list[str]], ahead: int):
        self.read = 0  # bytes read so far
        self.waiting = False  # the thread is waiting for the stream to move on
        self._ranges: list[list[tuple[Path, int, int]]] = []  # per output: (file, offset, length)
        self._ends: list[int] = []  # bytes through each output's inputs
        seen, total = set(), 0
        for names in steps:
            ranges = []
            for n in names:
                e = reader.entries.get(n)
                if n in seen or e is None or e.end == e.begin:
                    continue
                seen.add(n)
                ranges.append((e.file, reader._starts[e.file] + e.begin, e.end - e.begin))
                total += e.end - e.begin
            self._ranges.append(ranges)
            self._ends.append(total)
        self._ahead = ahead
        self._limit = (self._ends[0] if self._ends else 0) + ahead
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="vcyclefx-read-ahead", daemon=True)
        self._thread.start()

    def at(self, k: int) -> None:
        """The stream starts making output ``k``: read up to ``ahead`` bytes past its inputs."""
        with self._cond:
            self._limit = self._ends[min(k, len(self._ends) - 1)] + self._ahead
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        if not hasattr(os, "preadv"):  # not on this platform: the stream reads as it goes
            with self._cond:
                self.waiting = True
            return
        buf = bytearray(self.CHUNK)
        fds: dict[Path, int] = {}
        try:
            for ranges in self._ranges:
                for path, offset, length in ranges:
                    pos = 0
                    while pos < length:
                        n = min(self.CHUNK, length - pos)
                        with self._cond:
                            while not self._stop and self.read + n > self._limit:
                                self.waiting = True
                                self._cond.wait()
                            self.waiting = False
                            if self._stop:
                                return
                        if path not in fds:
                            fds[path] = os.open(path, os.O_RDONLY)
                        got = os.preadv(fds[path], [memoryview(buf)[:n]], offset + pos)
                        if got <= 0:
                            return
                        pos += got
                        self.read += got
        except OSError:
            return
        finally:
            for fd in fds.values():
                os.close(fd)
            with self._cond:
                self.waiting = True


# ---------------------------------------------------------------------------------------------
# writing


def nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


class ShardWriter:
    """Writes tensors given in a fixed order into shards of at most ``max_bytes`` (a tensor larger
    than that gets a shard of its own), named ``{stem}-0000k-of-0000n.safetensors`` (or
    ``{stem}.safetensors`` when one shard holds everything) with ``{stem}.safetensors.index.json``.

    ``layout``: ``[(name, dtype, shape)]`` in the order :meth:`write` will be called. ``metadata``
    goes into every shard's header (and the index).

    ``background=True``: the bytes of a tensor are written (and a full shard fsynced) by one
    worker thread while the caller makes the next tensor; :meth:`write` first waits for the
    previous tensor's write, so at most one written tensor is held beside the one being made,
    and a write error is raised by the next :meth:`write` or by :meth:`finish`, naming the shard
    and tensor that failed."""

    def __init__(self, directory, stem: str, layout: list[tuple], max_bytes: int,
                 metadata: dict | None = None, background: bool = False):
        self.directory = Path(directory)
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        shards: list[list[tuple]] = [[]]
        size = 0
        for name, dtype, shape in layout:
            n = nbytes(dtype, shape)
            if shards[-1] and size + n > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, tuple(shape), n))
            size += n
        count = len(shards)
        self.files = [f"{stem}.safetensors" if count == 1 else
                      f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.shards = shards
        self.index = None if count == 1 else f"{stem}.safetensors.index.json"
        self.where = {name: (i, j) for i, s in enumerate(shards) for j, (name, *_) in enumerate(s)}
        self._shard, self._pos, self._f = -1, 0, None
        self._written = 0  # tensors accepted by write(), in layout order
        self._pool = None
        self._pending = None  # the background write in flight
        if background:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="vcyclefx-shard-writer")

    def _open(self, i: int) -> None:
        entries, offset = {}, 0
        for name, dtype, shape, n in self.shards[i]:
            entries[name] = {"dtype": NAMES[dtype], "shape": list(shape),
                             "data_offsets": [offset, offset + n]}
            offset += n
        header = json.dumps({"__metadata__": self.metadata, **entries}).encode()
        header += b" " * (-len(header) % 8)  # data aligned to 8 bytes, as safetensors writes it
        path = self.directory / self.files[i]
        self._f = open(path, "wb")
        self._f.write(len(header).to_bytes(8, "little") + header)
        self._shard, self._pos = i, 0

    def write(self, name: str, t: torch.Tensor) -> None:
        """Append tensor ``name`` (the next one in the layout) to its shard; a shard is closed
        and flushed to disk when its last tensor is written."""
        i, dtype, shape, path = self._next(name)
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise CheckpointError(f"{path}: tensor {name} was laid out as {dtype} {list(shape)} "
                                  f"but is {t.dtype} {list(t.shape)} (a bug in vcyclefx)")
        self._send(i, name, t, last=True)

    def write_rows(self, name: str, blocks) -> None:
        """Append tensor ``name`` (the next one in the layout) from ``blocks``, consecutive
        blocks of its rows (along the first dimension), each written as it comes: the tensor is
        never held whole (with ``background=True``, one block is written while the next is
        made)."""
        i, dtype, shape, path = self._next(name)
        rows = 0
        for block in blocks:
            if block.dtype != dtype or tuple(block.shape[1:]) != shape[1:] or \
                    rows + block.shape[0] > shape[0]:
                raise CheckpointError(f"{path}: rows {rows}: of tensor {name} ({dtype} "
                                      f"{list(shape)}) came as {block.dtype} "
                                      f"{list(block.shape)} (a bug in vcyclefx)")
            rows += block.shape[0]
            self._send(i, name, block, last=rows == shape[0])
        if rows != shape[0]:
            raise CheckpointError(f"{path}: tensor {name} ended after {rows} of its {shape[0]} "
                                  "rows (a bug in vcyclefx)")

    def _next(self, name: str) -> tuple:
        """(shard, dtype, shape, shard path) of tensor ``name``, checked to be the next one in
        the layout, and counted as written."""
        i, j = self.where[name]
        _, dtype, shape, _ = self.shards[i][j]
        path = self.directory / self.files[i]
        if sum(len(s) for s in self.shards[:i]) + j != self._written:
            raise CheckpointError(f"{path}: tensor {name} written out of order (a bug in vcyclefx)")
        self._written += 1
        return i, dtype, shape, path

    def _send(self, i: int, name: str, t: torch.Tensor, last: bool) -> None:
        """Write ``t`` (tensor ``name``, or a block of its rows), by the worker thread where
        there is one (after the write before it, whose error it raises)."""
        data = t.detach().contiguous().cpu()
        if self._pool is None:
            self._put(i, name, data, last)
            return
        self._wait()
        self._pending = self._pool.submit(self._put, i, name, data, last)

    def _put(self, i: int, name: str, data: torch.Tensor, last: bool = True) -> None:
        """Write ``data``, tensor ``name`` or (``last`` False) a block of its rows that more
        follow."""
        path = self.directory / self.files[i]
        try:
            if self._shard != i:
                self._open(i)
            if data.numel():
                self._f.write(data.view(torch.uint8).reshape(-1).numpy().data)
            if not last:
                return
            self._pos += 1
            if self._pos == len(self.shards[i]):
                self._close()
        except OSError as e:
            self._abort_file()
            why = os.strerror(e.errno) if e.errno else str(e)
            raise CheckpointError(f"{path}: cannot write tensor {name} ({why}); free space on "
                                  "that disk or choose another -o") from e

    def _wait(self) -> None:
        """Wait for the background write in flight; raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _close(self) -> None:
        f, self._f = self._f, None
        f.flush()
        os.fsync(f.fileno())
        f.close()

    def _abort_file(self) -> None:
        if self._f is not None:
            f, self._f = self._f, None
            f.close()

    def abort(self) -> None:
        """Stop: wait for a background write (its error is dropped: the caller is already
        failing or done), close the open shard."""
        try:
            self._wait()
        except Exception:  # noqa: BLE001 - raised already by write()/finish() or superseded
            pass
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._abort_file()

    def finish(self, aliases: dict[str, str] | None = None) -> None:
        """Write the index (sharded output); ``aliases``: tied names, kept in the index."""
        self._wait()
        total = sum(n for s in self.shards for *_, n in s)
        if self._shard == -1 and self.shards == [[]]:  # nothing to write: an empty file
            self._open(0)
            self._close()
        if self._f is not None or self._shard != len(self.shards) - 1:
            raise CheckpointError(f"{self.directory}: not every tensor was written (a bug in "
                                  "vcyclefx)")
        if self.index is None:
            return
        spec = {"metadata": {"total_size": total, **self.metadata},
                "weight_map": {name: self.files[i] for name, (i, _) in self.where.items()}}
        if aliases:
            spec["aliases"] = aliases
        try:
            (self.directory / self.index).write_text(json.dumps(spec, indent=2))
        except OSError as e:
            raise CheckpointError(f"{self.directory / self.index}: cannot write the index ({e})") from e

"""Writing files safely, in one place: atomic files and directories, and safetensors with aliases
(and where vcyclefx's cache folder is).

Atomic writes: a file or directory is built under a temporary name beside its target, flushed
to disk (``fsync``), then renamed onto the target, so a reader sees the old version or the new
one, never a partial one. A writer that fails leaves the target as it was and no temporary
behind; parent directories it had to create are removed again, so a failed write creates
nothing.

Safetensors with aliases: a state dict may hold one tensor under several names (tied weights:
GPT-2's embedding and LM head). :func:`save_tensors` stores each tensor once and records
``{alias: stored name}`` in the file's metadata under ``"aliases"``; :func:`load_tensors` gives
every name back, the aliases as the same tensor (shared storage), as they were saved.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch

ALIASES_KEY = "aliases"  # the metadata entry of a safetensors file that holds the alias map


def cache_root() -> Path:
    """vcyclefx's cache folder: ``$VCYCLEFX_CACHE``, default ``~/.cache/vcyclefx`` (the driver's
    tokenised corpora, the capture cache's ``captures``)."""
    env = os.environ.get("VCYCLEFX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vcyclefx"


# ---------------------------------------------------------------------------------------------
# atomic files and directories


# fsync's answers for "this filesystem cannot flush that" (folders on some filesystems): nothing
# to do; any other failure (EIO, ENOSPC, EDQUOT) means the bytes may not be on the disk
_CANNOT_FLUSH = (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EPERM, errno.EISDIR)


def _fsync(path: Path) -> None:
    """Flush ``path`` to disk; a failure to flush a file's bytes raises a VCycleError naming it
    (a folder a filesystem cannot flush is passed over)."""
    from vcyclefx.errors import VCycleError

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _CANNOT_FLUSH:
            why = os.strerror(e.errno) if e.errno else str(e)
            raise VCycleError(f"{path}: cannot flush to disk ({why}); free space on that disk "
                              "or write somewhere else") from e
    finally:
        os.close(fd)


def fsync_tree(path) -> None:
    """Flush a file, or every file and folder under a directory, to disk."""
    path = Path(path)
    if path.is_dir():
        for sub in path.iterdir():
            fsync_tree(sub)
    _fsync(path)


def publish(src, dest) -> None:
    """Rename the finished ``src`` onto ``dest`` (same filesystem) and flush the rename."""
    os.replace(src, dest)
    _fsync(Path(dest).parent)


@contextlib.contextmanager
def _parents_of(target: Path) -> Iterator[None]:
    """Create ``target``'s missing parent folders; remove them again if the body fails."""
    missing = []
    parent = target.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in missing:  # deepest first; only if nothing else was put there meanwhile
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


@contextlib.contextmanager
def temporary_directory(beside) -> Iterator[Path]:
    """A fresh folder next to ``beside`` (same filesystem, so its files can be renamed there),
    removed with whatever is left in it on exit."""
    beside = Path(beside)
    with _parents_of(beside):
        tmp = Path(tempfile.mkdtemp(dir=beside.parent, prefix=f".{beside.name}.tmp-"))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """``with atomic_path(FILE) as tmp:`` write the file ``tmp`` (same folder and suffix as
    ``FILE``, so writers that go by the suffix work); on success it is flushed and renamed onto
    ``FILE``, on any error it is removed and ``FILE`` is untouched."""
    path = Path(path)
    with _parents_of(path):
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.",
                                    suffix=f".tmp{path.suffix}")
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            fsync_tree(tmp)
            publish(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def atomic_write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj, indent: int | None = None) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent))


@contextlib.contextmanager
def atomic_directory(target) -> Iterator[Path]:
    """``with atomic_directory(DIR) as tmp:`` write into ``tmp``; on success everything in it is
    flushed and ``tmp`` becomes ``DIR`` (an existing ``DIR`` is replaced), on any error ``tmp``
    is removed and ``DIR`` does not appear (nor any parent folder made for it)."""
    target = Path(target)
    with temporary_directory(target) as tmp:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            publish(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            publish(tmp, target)


# ---------------------------------------------------------------------------------------------
# safetensors with aliases


def _view_key(t: torch.Tensor):
    """Tensors with equal keys are the same values in the same memory (one tied tensor)."""
    if t.numel() == 0 or t.device.type == "meta":
        return ("object", id(t))
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            tuple(t.stride()), t.dtype)


def aliases_of(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{alias: name}`` for every entry of ``state`` that is the same tensor (same object, or a
    view of the same memory with the same shape, strides and dtype) as an earlier entry
    ``name``."""
    first: dict[object, str] = {}
    aliases = {}
    for name, t in state.items():
        key = _view_key(t)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def _stored(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One CPU tensor per distinct tensor of ``state``, and the alias map of the others. Tensors
    that overlap in memory without being the same view are copied (safetensors refuses
    shared memory)."""
    aliases = aliases_of(state)
    tensors, storages = {}, set()
    for name, t in state.items():
        if name in aliases:
            continue
        t = t.detach()
        storage = (t.device, t.untyped_storage().data_ptr()) if t.numel() else None
        if storage is not None and storage in storages:
            t = t.clone()
        storages.add(storage)
        tensors[name] = t.contiguous().cpu()
    return tensors, aliases


def _with_aliases(tensors: dict[str, torch.Tensor], metadata: dict | None,
                  aliases: dict[str, str] | None) -> dict[str, torch.Tensor]:
    if metadata and ALIASES_KEY in metadata:
        aliases = json.loads(metadata[ALIASES_KEY])
    state = dict(tensors)
    for alias, name in (aliases or {}).items():
        state[alias] = tensors[name]  # the same tensor under both names
    return state


def save_tensors(path, state: dict[str, torch.Tensor]) -> Path:
    """Write ``state`` as a safetensors file, atomically, each tensor once (aliases in the
    metadata)."""
    from safetensors.torch import save_file

    tensors, aliases = _stored(state)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={ALIASES_KEY: json.dumps(aliases)})
    return Path(path)


def load_tensors(path, aliases: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Every name :func:`save_tensors` wrote, aliases sharing their tensor's storage.
    ``aliases`` is the alias map of a file written before it was kept in the metadata (older
    level directories list it in ``level.json``, ``--format module`` ones in ``module.json``);
    the file's own map wins."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return _with_aliases(load_file(str(path)), metadata, aliases)


def tensors_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """:func:`save_tensors` to bytes."""
    from safetensors.torch import save

    tensors, aliases = _stored(state)
    return save(tensors, metadata={ALIASES_KEY: json.dumps(aliases)})


def _metadata_of(data: bytes) -> dict:
    """The ``__metadata__`` of safetensors bytes (8-byte little-endian header length, JSON)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


def tensors_from_bytes(data: bytes, aliases: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """:func:`load_tensors` from bytes."""
    from safetensors.torch import load

    return _with_aliases(load(data), _metadata_of(data), aliases)

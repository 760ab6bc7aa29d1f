"""Token data for the training driver: corpus loading, caching, and deterministic batches.

Sources (``--data``):

- nothing: the embedded default corpus, the ``.py`` source of the running interpreter's standard
  library (``sysconfig.get_paths()["stdlib"]``, without ``site-packages``/``dist-packages``; test
  packages are kept: they are real code and bring the corpus to about 30 MB). Byte-level tokens
  (vocabulary 256).
- ``python-site``: every ``.py`` file of the interpreter's path, the standard library and
  site-packages (``python_site_files``; a larger embedded corpus for GPU studies, split by file).
- a folder: every regular, non-hidden text file under it (files with a NUL byte in their first
  8 KB are skipped as binary), read as bytes.
- a text file: its bytes.
- a token file: ``.npy`` (dtype uint8, uint16 or uint32), or ``.bin`` = raw little-endian
  **uint16** unless the file name contains ``uint8`` or ``uint32`` (e.g. ``train.uint32.bin``).
  If it is called ``train.bin``/``train.npy`` and a ``val.bin``/``val.npy`` sits next to it
  (nanoGPT's layout), that file is the validation split.

Validation split: by file for the standard library, python-site and folders (a file is held out when the hash
of its relative path falls below ``val_fraction``), else the last ``val_fraction`` of the tokens.
Files are joined with a NUL byte between them. Corpora built from many files are cached as
``.npy`` (uint8) under the cache directory, written atomically, keyed by the list of files with
their sizes and modification times, so the second run only maps the cached arrays.

Batches are a pure function of ``(seed, split, step, micro-batch index)``: no loader state to
save, the same order for every schedule of a ``compare`` run, and any process of a distributed
run can produce its own share.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vcyclefx.driver.config import ConfigError
from vcyclefx.store import atomic_path

SEPARATOR = b"\x00"
TOKEN_DTYPES = (np.uint8, np.uint16, np.uint32)


@dataclass(frozen=True)
class TokenData:
    train: np.ndarray  # 1-D token ids
    val: np.ndarray
    vocab_size: int
    source: str  # what was read, for the log
    max_token: int = 255  # largest id in the data


def default_cache_dir() -> Path:
    from vcyclefx.store import cache_root

    return cache_root()


def stdlib_files() -> tuple[Path, list[Path]]:
    """The root of the standard library and its ``.py`` files (sorted, no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return root, sorted(files)


PYTHON_SITE = "python-site"


def python_site_files() -> tuple[Path, list[Path]]:
    """``--data python-site``: every ``.py`` file of the interpreter's path (the standard
    library and site-packages, ``sysconfig``'s stdlib/purelib/platlib), each once, sorted;
    the root is their common folder (split by file as a folder is). Hundreds of MB where
    torch and friends are installed: a larger corpus for GPU studies, still no download."""
    roots = sorted({Path(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib", "platlib")
                    if Path(sysconfig.get_paths()[k]).is_dir()})
    files: set[Path] = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            files.update(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return Path(os.path.commonpath([str(r) for r in roots])), sorted(p for p in files if p.is_file())


def _looks_binary(path: Path) -> bool:
    with path.open("rb") as f:
        return b"\x00" in f.read(8192)


def _folder_files(root: Path) -> list[Path]:
    """Regular, non-hidden files under ``root`` that look like text (no NUL in the first 8 KB)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted(p for p in files if p.is_file() and not _looks_binary(p))


def is_val_file(rel_path: str, val_fraction: float) -> bool:
    """Deterministic held-out choice by the hash of the relative path (stable across runs)."""
    h = int.from_bytes(hashlib.sha1(rel_path.encode()).digest()[:8], "big")
    return h / 2**64 < val_fraction


def _corpus_key(root: Path, files: list[Path], val_fraction: float) -> str:
    h = hashlib.sha1(f"v1 {root} {val_fraction}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _build_split(root: Path, files: list[Path], val_fraction: float):
    parts = {False: [], True: []}
    for p in files:
        parts[is_val_file(str(p.relative_to(root)), val_fraction)].append(p)
    if not parts[True] or not parts[False]:  # tiny folders: hold out the last file
        everything = parts[False] + parts[True]
        parts = {False: everything[:-1], True: everything[-1:]}
    out = []
    for held_out in (False, True):
        chunks = []
        for p in parts[held_out]:
            chunks += [p.read_bytes(), SEPARATOR]
        out.append(np.frombuffer(b"".join(chunks), dtype=np.uint8))
    return out[0], out[1]


def load_file_corpus(root: Path, files: list[Path], val_fraction: float, cache_dir: Path,
                     name: str) -> TokenData:
    """Byte tokens of ``files`` split by file, through the cache."""
    if len(files) < 2:
        raise ConfigError(f"{root} has {len(files)} file(s): a folder needs at least 2 files to "
                          "split by file (pass the single file itself instead)")
    key = _corpus_key(root, files, val_fraction)
    paths = [cache_dir / f"{name}-{key}.{s}.npy" for s in ("train", "val")]
    if not all(p.exists() for p in paths):
        train, val = _build_split(root, files, val_fraction)
        for p, arr in zip(paths, (train, val)):
            with atomic_path(p) as tmp:
                np.save(tmp, arr)  # tmp ends in .npy: np.save adds no suffix
    train, val = (np.load(p, mmap_mode="r") for p in paths)
    return TokenData(train, val, 256, f"{root} ({len(files)} files, bytes, cached in {cache_dir})")


def _token_file(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        if arr.dtype.type not in TOKEN_DTYPES or arr.ndim != 1:
            raise ConfigError(f"{path}: a token .npy must be 1-D uint8/uint16/uint32, got "
                              f"{arr.ndim}-D {arr.dtype}")
        return arr
    name = path.name.lower()
    dtype = np.uint32 if "uint32" in name else np.uint8 if "uint8" in name else np.uint16
    if path.stat().st_size % np.dtype(dtype).itemsize:
        raise ConfigError(f"{path}: size {path.stat().st_size} is not a multiple of "
                          f"{np.dtype(dtype).itemsize} bytes, so it is not raw {np.dtype(dtype)}: "
                          "put 'uint8' or 'uint32' in the name if that is its dtype")
    return np.memmap(path, dtype=dtype, mode="r")


def _tail_split(tokens: np.ndarray, val_fraction: float):
    n_val = max(1, int(len(tokens) * val_fraction))
    return tokens[:-n_val], tokens[-n_val:]


def _vocab(arrays, vocab_size: int) -> tuple[int, int]:
    """(vocabulary size, largest id); one pass over the tokens."""
    top = max(int(a.max()) for a in arrays)
    return (vocab_size or (top + 1 + 63) // 64 * 64), top


def load_data(data: str, val_fraction: float, cache_dir: str = "", vocab_size: int = 0) -> TokenData:
    """The token data named by ``--data`` (see the module docstring)."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if not data:
        root, files = stdlib_files()
        return load_file_corpus(root, files, val_fraction, cache, "stdlib")
    if data == PYTHON_SITE:
        root, files = python_site_files()
        return load_file_corpus(root, files, val_fraction, cache, PYTHON_SITE)
    path = Path(data)
    if not path.exists():
        raise ConfigError(f"--data {data}: no such file or folder")
    if path.is_dir():
        return load_file_corpus(path, _folder_files(path), val_fraction, cache, "folder")
    if path.suffix in (".npy", ".bin"):
        tokens = _token_file(path)
        sibling = path.with_name(f"val{path.suffix}")
        sibling = sibling if path.stem == "train" and sibling.exists() else None
        train, val = (tokens, _token_file(sibling)) if sibling else _tail_split(tokens, val_fraction)
        vocab, top = _vocab((train, val), vocab_size)
        return TokenData(train, val, vocab, f"{path} ({np.dtype(tokens.dtype)} tokens)", top)
    if _looks_binary(path):
        raise ConfigError(f"--data {data}: looks binary (NUL bytes) and is neither .npy nor .bin; "
                          "a token file must end in .npy or .bin, a text file must be text")
    train, val = _tail_split(np.fromfile(path, dtype=np.uint8), val_fraction)
    return TokenData(train, val, vocab_size or 256, f"{path} (bytes)")


class Batches:
    """Random ``(B, T+1)`` windows of one split, a pure function of ``(seed, step, micro)``."""

    SPLITS = {"train": 0, "val": 1}

    def __init__(self, tokens: np.ndarray, split: str, batch_size: int, seq_len: int, seed: int,
                 device: torch.device):
        if len(tokens) < seq_len + 2:
            raise ConfigError(f"the {split} split has {len(tokens)} tokens, fewer than --seq-len "
                              f"{seq_len} + 2: use more data or a shorter --seq-len")
        self.tokens, self.split = tokens, split
        self.B, self.T, self.seed, self.device = batch_size, seq_len, seed, device

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``(B, T)`` and next-token targets ``(B, T)``, int64 on the device."""
        rng = np.random.default_rng([self.seed, self.SPLITS[self.split], step, micro])
        starts = rng.integers(0, len(self.tokens) - self.T - 1, size=self.B)
        windows = np.stack([self.tokens[s:s + self.T + 1] for s in starts]).astype(np.int64)
        w = torch.from_numpy(windows)  # (B, T+1)
        if self.device.type == "cuda":
            w = w.pin_memory().to(self.device, non_blocking=True)
        return w[:, :-1], w[:, 1:]

"""Driver data: the stdlib corpus and its cache, --data sources, deterministic batches."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from vcyclefx.driver.config import ConfigError
from vcyclefx.driver.data import Batches, is_val_file, load_data, stdlib_files


def test_stdlib_corpus_is_split_by_file_cached_and_loaded_fast_the_second_time(tmp_path):
    root, files = stdlib_files()
    assert len(files) > 500 and not any("site-packages" in str(p) for p in files)
    first = load_data("", 0.05, str(tmp_path))
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert len(cached) == 2 and all(n.startswith("stdlib-") and n.endswith(".npy") for n in cached)
    assert first.vocab_size == 256 and first.train.dtype == np.uint8
    total = sum(p.stat().st_size for p in files) + len(files)  # + one separator per file
    assert len(first.train) + len(first.val) == total
    assert 20e6 < total < 60e6
    val_files = [p for p in files if is_val_file(str(p.relative_to(root)), 0.05)]
    assert len(first.val) == sum(p.stat().st_size + 1 for p in val_files)
    t = time.perf_counter()
    second = load_data("", 0.05, str(tmp_path))
    assert time.perf_counter() - t < 2.0
    assert np.array_equal(first.val, second.val) and len(first.train) == len(second.train)
    assert sorted(p.name for p in tmp_path.iterdir()) == cached  # no temporary files left


def test_text_file_and_folder_sources(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 100)
    d = load_data(str(tmp_path / "a.txt"), 0.1, str(tmp_path / "c"))
    assert (len(d.train), len(d.val)) == (1080, 120) and d.vocab_size == 256
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.txt").write_text(f"file {i} " * 50)
    (folder / "image.png").write_bytes(b"\x89PNG\x00\x00" * 100)  # skipped: binary
    (folder / ".hidden").write_text("skipped " * 100)
    d = load_data(str(folder), 0.05, str(tmp_path / "c"))
    assert len(d.train) + len(d.val) == 2 * 350 + 2 and min(len(d.train), len(d.val)) == 351


def test_token_files_npy_bin_and_their_dtypes(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(1000, dtype=np.uint16))
    d = load_data(str(tmp_path / "t.npy"), 0.1, "")
    assert d.train.dtype == np.uint16 and len(d.val) == 100 and d.vocab_size == 1024
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "tok.bin")
    assert load_data(str(tmp_path / "tok.bin"), 0.1, "").train[999 - 100] == 899
    np.arange(70000, dtype=np.uint32).tofile(tmp_path / "tok.uint32.bin")
    d = load_data(str(tmp_path / "tok.uint32.bin"), 0.1, "")
    assert d.train.dtype == np.uint32 and d.vocab_size == 70016
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "val.bin")
    d = load_data(str(tmp_path / "train.bin"), 0.1, "")
    assert (len(d.train), len(d.val)) == (100, 10)  # nanoGPT layout: the sibling val.bin


@pytest.mark.parametrize("make,msg", [
    (lambda p: np.save(p / "x.npy", np.zeros(10, dtype=np.float32)), "1-D uint8/uint16/uint32"),
    (lambda p: (p / "x.bin").write_bytes(b"abc"), "not a multiple of 2 bytes"),
    (lambda p: (p / "x.dat").write_bytes(b"\x00\x01" * 10), "looks binary"),
])
def test_unusable_data_fails_with_a_clear_message(tmp_path, make, msg):
    make(tmp_path)
    path = next(tmp_path.iterdir())
    with pytest.raises(ConfigError, match=msg):
        load_data(str(path), 0.1, str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="no such file"):
        load_data(str(tmp_path / "missing"), 0.1, "")


def test_batches_are_a_pure_function_of_seed_step_and_micro_batch():
    tokens = np.arange(5000, dtype=np.uint16) % 256
    b = Batches(tokens, "train", 4, 16, seed=3, device=torch.device("cpu"))
    x, y = b.get(7, 1)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    assert torch.equal(b.get(7, 1)[0], x)
    assert not torch.equal(b.get(7, 0)[0], x) and not torch.equal(b.get(8, 1)[0], x)
    other_seed = Batches(tokens, "train", 4, 16, seed=4, device=torch.device("cpu"))
    assert not torch.equal(other_seed.get(7, 1)[0], x)
    with pytest.raises(ConfigError, match="fewer than --seq-len"):
        Batches(tokens[:10], "val", 4, 16, seed=3, device=torch.device("cpu"))

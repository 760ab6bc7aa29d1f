"""vcyclefx.store: atomic files and directories, safetensors with aliases (tied tensors once)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from vcyclefx.store import (aliases_of, atomic_directory, atomic_path, atomic_write_json,
                            atomic_write_text, load_tensors, save_tensors, tensors_from_bytes,
                            tensors_to_bytes)


class Boom(RuntimeError):
    pass


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "trunc')  # half written, then the writer fails
            raise Boom
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_an_atomic_write_replaces_the_file_and_keeps_the_suffix_for_writers_that_need_it(tmp_path):
    target = tmp_path / "a" / "loss.png"  # the parent is created
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == target.parent and not target.exists()
        tmp.write_bytes(b"png")
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and [p.name for p in target.parent.iterdir()] == ["loss.png"]


def test_a_failed_atomic_write_leaves_no_parent_folder_it_made(tmp_path):
    with pytest.raises(Boom):
        with atomic_path(tmp_path / "x" / "y" / "f.txt"):
            raise Boom
    assert list(tmp_path.iterdir()) == []


def test_a_failed_atomic_directory_leaves_no_directory_and_no_temporary(tmp_path):
    target = tmp_path / "runs" / "level1"
    with pytest.raises(Boom):
        with atomic_directory(target) as tmp:
            (tmp / "weights.safetensors").write_bytes(b"partial")
            raise Boom
    assert list(tmp_path.iterdir()) == []  # neither level1 nor the runs/ made for it


def test_an_atomic_directory_replaces_an_old_one_only_when_complete(tmp_path):
    target = tmp_path / "level"
    with atomic_directory(target) as tmp:
        (tmp / "level.json").write_text("old")
    with pytest.raises(Boom):
        with atomic_directory(target) as tmp:
            (tmp / "level.json").write_text("new")
            raise Boom
    assert (target / "level.json").read_text() == "old"
    with atomic_directory(target) as tmp:
        (tmp / "level.json").write_text("new")
    assert (target / "level.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["level"]


def test_a_file_that_cannot_be_flushed_fails_the_directory_and_names_the_file(tmp_path,
                                                                              monkeypatch):
    """fsync's EIO/ENOSPC on a file is an error naming it (its bytes may not be on the disk) and
    no directory appears; a folder the filesystem cannot flush (EINVAL) is passed over."""
    import errno
    import os

    from vcyclefx.errors import VCycleError

    fsync = os.fsync

    def failing(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.isdir(path):
            raise OSError(errno.EINVAL, "Invalid argument")
        if path.endswith("weights.bin"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    target = tmp_path / "level"
    with pytest.raises(VCycleError, match=r"weights\.bin: cannot flush to disk \(No space left"):
        with atomic_directory(target) as tmp:
            (tmp / "weights.bin").write_bytes(b"x" * 10)
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:  # folders that cannot be flushed: written all the same
        (tmp / "level.json").write_text("{}")
    assert (target / "level.json").read_text() == "{}"


def _tied_state():
    emb = torch.nn.Embedding(1000, 100)
    head = torch.nn.Linear(100, 1000, bias=False)
    head.weight = emb.weight  # GPT-2's tie
    model = torch.nn.Sequential(emb, head)
    return model, model.state_dict(keep_vars=True)


def test_tied_tensors_are_stored_once_and_load_back_sharing_storage(tmp_path):
    model, state = _tied_state()
    assert aliases_of(state) == {"1.weight": "0.weight"}
    assert aliases_of(model.state_dict()) == {"1.weight": "0.weight"}  # detached views too
    tied = save_tensors(tmp_path / "tied.safetensors", state)
    untied = tmp_path / "untied.safetensors"
    save_file({"0.weight": state["0.weight"].detach().clone(),
               "1.weight": state["1.weight"].detach().clone()}, str(untied))
    one_copy = 1000 * 100 * 4
    assert one_copy <= tied.stat().st_size < 1.01 * one_copy < 2 * one_copy <= untied.stat().st_size
    back = load_tensors(tied)
    assert back.keys() == state.keys()
    assert back["0.weight"].data_ptr() == back["1.weight"].data_ptr()
    assert torch.equal(back["1.weight"], state["0.weight"].detach())
    fresh, _ = _tied_state()
    fresh.load_state_dict(back, strict=True)
    assert fresh[0].weight is fresh[1].weight


def test_tensors_round_trip_through_bytes_with_their_aliases():
    _, state = _tied_state()
    state = {**state, "extra": torch.arange(6.0).reshape(2, 3)}
    data = tensors_to_bytes(state)
    assert len(data) < 1.01 * 1000 * 100 * 4
    back = tensors_from_bytes(data)
    assert back.keys() == state.keys()
    assert back["0.weight"].data_ptr() == back["1.weight"].data_ptr()
    assert torch.equal(back["extra"], state["extra"])


def test_overlapping_views_that_are_not_the_same_tensor_are_stored_as_copies(tmp_path):
    base = torch.arange(12.0)
    state = {"a": base[:8], "b": base[4:], "c": base[:8]}
    assert aliases_of(state) == {"c": "a"}
    back = load_tensors(save_tensors(tmp_path / "v.safetensors", state))
    assert torch.equal(back["a"], base[:8]) and torch.equal(back["b"], base[4:])
    assert back["c"].data_ptr() == back["a"].data_ptr()


def test_files_written_before_the_alias_map_moved_into_the_metadata_still_load(tmp_path):
    _, state = _tied_state()
    old = tmp_path / "weights.safetensors"
    save_file({"0.weight": state["0.weight"].detach().clone()}, str(old))  # no metadata
    back = load_tensors(old, aliases={"1.weight": "0.weight"})  # the map from level.json
    assert back["1.weight"].data_ptr() == back["0.weight"].data_ptr()
    assert load_tensors(old).keys() == {"0.weight"}  # without the map: what the file holds


def test_a_level_directory_stores_the_tied_gpt2_embedding_once_and_reloads_it_tied(tmp_path):
    import vcyclefx as vf
    from vcyclefx import zoo
    from vcyclefx.export.leveldir import load_level, save_level

    model, example = zoo.gpt2()
    level = vf.capture(model.eval(), example)  # no dropout: outputs comparable
    save_level(level, tmp_path / "new")
    summary = json.loads((tmp_path / "new" / "level.json").read_text())
    assert "aliases" not in summary and "lm_head.weight" not in summary["tensors"]
    back, _ = load_level(tmp_path / "new")
    assert back.get_parameter("lm_head.weight") is back.get_parameter("transformer.wte.weight")
    with torch.no_grad():
        assert torch.equal(back(*example).logits, level(*example).logits)


def test_a_level_directory_from_before_the_alias_map_moved_loads_tied(tmp_path):
    """Older level directories list the tied names in level.json and keep plain safetensors."""
    import vcyclefx as vf
    from vcyclefx import zoo
    from vcyclefx.export.leveldir import load_level, save_level

    model, example = zoo.gpt2()
    level = vf.capture(model.eval(), example)  # no dropout: outputs comparable
    old = save_level(level, tmp_path / "old")
    stored = load_tensors(old / "weights.safetensors")
    del stored["lm_head.weight"]
    save_file({k: v.clone() for k, v in stored.items()}, str(old / "weights.safetensors"))
    summary = json.loads((old / "level.json").read_text())
    summary["aliases"] = {"lm_head.weight": "transformer.wte.weight"}
    (old / "level.json").write_text(json.dumps(summary))
    back, _ = load_level(old)
    assert back.get_parameter("lm_head.weight") is back.get_parameter("transformer.wte.weight")
    with torch.no_grad():
        assert torch.equal(back(*example).logits, level(*example).logits)

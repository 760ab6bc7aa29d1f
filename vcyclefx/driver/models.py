"""``--model``: the causal LM architectures the driver trains besides its built-in GPT.

- a Hugging Face ``config.json`` (or a directory holding one, e.g. ``save_pretrained`` output):
  the architecture it names (``AutoModelForCausalLM.from_config``), with random weights, the
  vocabulary set from the data and the position table at least ``--seq-len``; nothing is
  downloaded. Trained models are also written as ``<schedule>-hf/`` (``from_pretrained``);
- ``pkg.mod:factory``: ``factory(vocab_size=..., seq_len=...)`` returns the module.

A model's forward takes token ids ``(B, T)`` and returns logits ``(B, T, vocab)`` or an output
with ``.logits`` (a Hugging Face ``CausalLMOutput``).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from vcyclefx.driver.config import ConfigError
from vcyclefx.export.module import to_module
from vcyclefx.level import is_level
from vcyclefx.store import atomic_directory


def logits_of(out) -> torch.Tensor:
    """The logits of a model output: the tensor itself, or a ModelOutput's ``.logits``."""
    return out if isinstance(out, torch.Tensor) else out.logits


def lm_loss(out, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of a model output's logits ``(B, T, vocab)`` against ``targets``
    ``(B, T)``, in float32."""
    return F.cross_entropy(logits_of(out).flatten(0, 1).float(), targets.flatten())


def _hf_config(path: Path):
    import transformers

    transformers.logging.set_verbosity_error()
    where = path if path.is_dir() else path.parent
    if path.is_file() and path.name != "config.json":
        raise ConfigError(f"--model {path}: a Hugging Face config must be called config.json")
    try:
        return transformers.AutoConfig.from_pretrained(str(where), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"--model {path}: not a Hugging Face config ({type(e).__name__}: "
                          f"{e})") from e


def check_model(spec: str) -> None:
    """Fail at start-up (before any output is written) if ``--model`` names nothing usable."""
    if not spec:
        return
    path = Path(spec)
    if path.exists():
        _hf_config(path)
    elif ":" not in spec:
        raise ConfigError(f"--model {spec}: no such file or folder, and not pkg.mod:factory")


def build_causal_lm(spec: str, *, vocab_size: int, seq_len: int, seed: int) -> torch.nn.Module:
    path = Path(spec)
    torch.manual_seed(seed)
    if path.exists():
        import transformers

        cfg = _hf_config(path)
        cfg.vocab_size = vocab_size
        cfg.use_cache = False  # a cache in the outputs cannot be captured (and is not needed)
        for name in ("max_position_embeddings", "n_positions"):
            if getattr(cfg, name, None) is not None and getattr(cfg, name) < seq_len:
                setattr(cfg, name, seq_len)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value >= vocab_size:
                setattr(cfg, name, 0)
        try:
            return transformers.AutoModelForCausalLM.from_config(cfg)
        except ValueError as e:
            raise ConfigError(f"--model {spec}: {type(cfg).__name__} is not a causal LM "
                              f"architecture ({e})") from e
    if ":" not in spec:
        raise ConfigError(f"--model {spec}: no such file or folder, and not pkg.mod:factory")
    mod_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--model {spec}: cannot import {attr!r} from {mod_name!r} ({e})") from e
    model = factory(vocab_size=vocab_size, seq_len=seq_len)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"--model {spec}: {attr}() returned {type(model).__name__}, not a module")
    return model


def save_hf(module: torch.nn.Module, directory: Path) -> None:
    """``module`` (a Hugging Face model, or a level of one) as ``save_pretrained`` output,
    written to a temporary sibling and renamed into place."""
    if is_level(module):
        module = to_module(module)
    if not hasattr(module, "save_pretrained"):
        return
    with atomic_directory(directory) as tmp:
        module.save_pretrained(str(tmp), safe_serialization=True)

"""A Hugging Face checkpoint's tensors under the names of the model transformers builds.

transformers (5.x) loads many checkpoints through a conversion mapping
(``transformers.conversion_mapping``): keys are renamed (GPT-NeoX's ``embed_out`` is the model's
``lm_head``) and tensors converted (Mixtral's per-expert ``w1``/``w3`` are stacked and
concatenated into one ``experts.gate_up_proj``; Qwen3-MoE's and OLMoE's experts the
same way). A model built on the meta device has the converted names, which no shard holds.

:func:`plan` works out, from the shards' headers alone and with transformers' own rules (the
loop of ``core_model_loading.convert_and_load_state_dict_in_model``: the same renaming, the same
key order, the same converters), which checkpoint tensors make each of the model's tensors, and
teaches a :class:`~vcyclefx.export.shards.ShardReader` to read the model's names: a renamed
tensor is read under its checkpoint name; a converted one is made when it is read, from its
source tensors, by a fresh copy of transformers' converter (the values ``from_pretrained``
loads, bit for bit). Its shape and dtype come from running the converter on meta tensors.
"""

from __future__ import annotations

import copy

import torch

from vcyclefx.errors import CheckpointError


def _rules():
    """transformers' conversion API, or None (a transformers without it converts nothing)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, WeightRenaming,
                                                     dot_natural_key, rename_source_key)
    except ImportError:
        return None
    return get_model_conversion_mapping, WeightConverter, WeightRenaming, dot_natural_key, \
        rename_source_key


def plan(model, reader) -> bool:
    """Teach ``reader`` the names of ``model`` (built on the meta device by its class) that its
    checkpoint holds under other names or in other forms (see the module docstring); returns
    whether there were any. Checkpoint tensors that make none of the model's are left alone, as
    ``from_pretrained`` ignores them."""
    rules = _rules()
    if rules is None or not hasattr(model, "base_model_prefix"):
        return False
    get_mapping, converter_type, renaming_type, natural, rename = rules
    try:
        transforms = get_mapping(model)
    except Exception:  # noqa: BLE001 - a model transformers has no mapping for
        return False
    renamings = [t for t in transforms if isinstance(t, renaming_type)]
    converters = [t for t in transforms if isinstance(t, converter_type)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    state = model.state_dict()
    prefix = model.base_model_prefix
    groups: dict[str, tuple] = {}  # first target name -> (converter, [(target, source, pattern)])
    for key in sorted(reader.entries, key=natural):
        renamed, pattern = rename(key, renamings, converters, prefix, state)
        if renamed not in state and key in state:
            renamed, pattern = rename(key, [], [], prefix, state)
        if renamed not in state:
            continue
        if pattern is None:
            if renamed != key:
                reader.renamed[renamed] = key
            continue
        group = groups.setdefault(renamed, (copy.deepcopy(by_pattern[pattern]), []))
        group[1].append((renamed, key, pattern))
    for first, (converter, sources) in groups.items():
        made = _convert(converter, first, sources, model,
                        lambda name: torch.empty(reader.entries[name].shape,
                                                 dtype=reader.entries[name].dtype, device="meta"))
        for target, t in made.items():
            if target not in state:
                raise CheckpointError(
                    f"{reader.directory}: transformers' conversion of "
                    f"{', '.join(s for _, s, _ in sources[:3])} makes {target}, which "
                    f"{type(model).__name__} does not have (a transformers version other than "
                    "the checkpoint's?)")
            reader.derived[target] = _Derived(first, converter, sources, model,
                                              t.dtype, tuple(t.shape), target)
    return bool(reader.renamed or reader.derived)


def _convert(prototype, first: str, sources: list, model, read) -> dict[str, torch.Tensor]:
    """transformers' conversion of one group: a fresh copy of its converter fed ``read(name)``
    of each source tensor, in the order ``from_pretrained`` feeds them."""
    converter = copy.deepcopy(prototype)
    for target, source, pattern in sources:
        converter.add_tensor(target, source, pattern, lambda s=source: read(s))
    try:
        made = converter.convert(first, model=model, config=getattr(model, "config", None))
    except Exception as e:  # noqa: BLE001 - transformers' own errors name no file
        raise CheckpointError(f"cannot convert {', '.join(s for _, s, _ in sources[:3])} into "
                              f"{first} as transformers does ({type(e).__name__}: {e})") from e
    return {k: (v[0] if isinstance(v, list) else v) for k, v in made.items()}


class _Derived:
    """A model tensor made from checkpoint tensors by a transformers converter."""

    def __init__(self, first, converter, sources, model, dtype, shape, target):
        self.first, self.converter, self.sources, self.model = first, converter, sources, model
        self.dtype, self.shape, self.target = dtype, shape, target

    @property
    def names(self) -> list[str]:
        return [s for _, s, _ in self.sources]

    def make(self, read) -> torch.Tensor:
        """The tensor, from ``read(names) -> {name: tensor}`` of its sources."""
        got = read(self.names)
        value = _convert(self.converter, self.first, self.sources, self.model,
                         lambda name: got[name])[self.target]
        if value.dtype != self.dtype or tuple(value.shape) != self.shape:
            raise CheckpointError(f"{self.target} converted as {value.dtype} "
                                  f"{list(value.shape)}, planned as {self.dtype} "
                                  f"{list(self.shape)} (a bug in vcyclefx)")
        return value


__all__ = ["plan"]

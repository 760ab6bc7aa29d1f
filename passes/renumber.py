"""Renumbering the numbered siblings after a chain whose block count a depth change alters.

A container may hold, after a chain, other numbered children (torchvision MobileNetV2's
``features``: the chain's blocks, then the next stages' blocks and a final conv at
``features.18``). When the chain loses or gains ``d`` blocks, each later sibling ``<prefix><i>``
becomes ``<prefix><i + d>``: its tensors and the module paths in its nodes' ``nn_module_stack``,
all at once, so the level's state_dict keys follow the original model's names with the new count.
"""

from __future__ import annotations

import re

from torch.fx import GraphModule

from vcyclefx.analysis.ownership import is_application, ownership

_NUMBERED = re.compile(r"(.*?)(\d+)")


def block_index(block: str) -> int:
    m = _NUMBERED.fullmatch(block.rsplit(".", 1)[-1])
    return int(m.group(2)) if m and not is_application(block) else -1


def shifted(block: str, d: int) -> str:
    """``block`` renumbered by ``d`` (``features.7`` shifted by -1: ``features.6``)."""
    if not d or is_application(block):
        return block
    base, _, tail = block.rpartition(".")
    m = _NUMBERED.fullmatch(tail)
    return f"{base}{'.' if base else ''}{m.group(1)}{int(m.group(2)) + d}"


def renumbering(gm: GraphModule, src: list[str], d: int) -> dict[str, str]:
    """The later siblings of the chain in its container (modules numbered like its blocks,
    after its last block), old path -> path renumbered by ``d``."""
    if not d or is_application(src[0]):
        return {}
    _, children = ownership(gm)
    base, _, tail = src[-1].rpartition(".")
    prefix, last = _NUMBERED.fullmatch(tail).groups()
    out = {}
    names = set(children.get(base, []))
    names |= {t.rsplit(".", 1)[0] for t in state_names(gm)}
    for name in names:
        head, _, rest = name[len(base) + 1:].partition(".") if base else name.partition(".")
        if (base and not name.startswith(base + ".")) or not head.startswith(prefix):
            continue
        num = head[len(prefix):]
        if num.isdigit() and int(num) > int(last):
            old = f"{base}.{head}" if base else head
            out[old] = shifted(old, d)
    return out


def state_names(gm: GraphModule) -> set[str]:
    state = {k for k, _ in gm.named_parameters(remove_duplicate=False)}
    return state | {k for k, _ in gm.named_buffers(remove_duplicate=False)}


def rename(name: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return name


def renumber_stack(meta: dict, renames: dict[str, str]) -> dict:
    """``meta`` with the module paths (and stack keys) of renumbered siblings renamed, all at
    once (``features.8 -> 7`` must not then meet ``features.7 -> 6``)."""
    stack = meta.get("nn_module_stack")
    if not stack:
        return meta
    out = {}
    for k, (path, typ) in stack.items():
        new_path = rename(path, renames) if isinstance(path, str) else path
        if new_path != path:
            old = next(o for o in renames if path == o or path.startswith(o + "."))
            k = re.sub(re.escape(old) + r"(?=\.|$|@)", renames[old], k, count=1)
        out[k] = (new_path, typ)
    meta = dict(meta)
    meta["nn_module_stack"] = out
    return meta



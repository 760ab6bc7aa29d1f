"""``--format hf`` / ``--format module``: a level as the user's own class on disk.

- ``hf``: what the model's ``save_pretrained`` writes (``config.json`` with the new sizes,
  ``model.safetensors``), so that its auto class loads it with ``from_pretrained(DIR)``;
- ``module``: ``model.safetensors`` (each tensor once, tied names in its metadata:
  ``vcyclefx.store``) and ``module.json``: the call that builds the original class at the level's
  sizes (``{"call": "timm.models...VisionTransformer", "kwargs": {...}}``) and how to load it
  (:func:`load_module`; older directories list the tied names in ``module.json``).

Both are solved and verified (``vf.to_module``) before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from vcyclefx.capture.recipe import HF, Recipe
from vcyclefx.errors import LevelError
from vcyclefx.export.module import solve
from vcyclefx.store import load_tensors, save_tensors

FORMAT = "vcyclefx.module"


def module_writer(level, fmt: str):
    """Solve for ``level``'s class now (errors before any file exists); returns the function
    that writes the files of ``fmt`` into a directory."""
    recipe, overrides, module, err = solve(level)
    module.train(level.training)
    if fmt == "hf":
        if recipe.kind != HF:
            raise LevelError(f"--format hf needs a Hugging Face model; {recipe.target} is not one "
                             "(use --format module)")

        def write_hf(tmp: Path) -> None:
            module.save_pretrained(str(tmp), safe_serialization=True)

        return write_hf
    if fmt != "module":
        raise LevelError(f"--format {fmt!r} is not one of level, hf, module")

    def write_module(tmp: Path) -> None:
        save_tensors(tmp / "model.safetensors", module.state_dict(keep_vars=True))
        spec = {"format": FORMAT, "recipe": Recipe(recipe.kind, recipe.target,
                                                   recipe.config(overrides), recipe.attn,
                                                   recipe.factory).to_json(),
                "call": recipe.target, "kwargs": recipe.config(overrides),
                "changed": overrides, "relative_error": err}
        (tmp / "module.json").write_text(json.dumps(spec, indent=1))

    return write_module


def load_module(directory):
    """The module a ``--format module`` directory describes, its weights loaded strictly."""
    d = Path(directory)
    path = d / "module.json"
    if not path.is_file():
        raise LevelError(f"{d}: no module.json; write one with --format module")
    spec = json.loads(path.read_text())
    if spec.get("format") != FORMAT:
        raise LevelError(f"{path}: not a vcyclefx module description")
    module = Recipe.from_json(spec["recipe"]).build()
    state = load_tensors(d / "model.safetensors", spec.get("aliases"))
    module.load_state_dict(state, strict=True)
    return module

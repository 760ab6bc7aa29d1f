"""The V-cycle: an iterable of training stages over levels, for any training loop.

Stage order for L levels (the paper's V-cycle): going down, level k trains ``E_k`` steps and is
coalesced to level k+1 (its weights are kept); at the coarsest level training runs longest;
going up, the level is de-coalesced to level k's shapes, interpolated with the weights kept at
level k (``theta = (1 - alpha) * kept + alpha * decoalesced``) and trained; level 0 trains to the
end. Users keep their own loop::

    cycle = vf.VCycle(model, example_inputs, levels=2, width=0.5, depth=0.5, alpha=0.25,
                      total_steps=10_000)
    print(cycle.schedule)
    for stage in cycle:                     # stage.level, stage.model, stage.steps, stage.lr_scale
        train(stage.model, stage.steps, lr=base_lr * stage.lr_scale)
    final = cycle.result()                  # level 0; its state_dict loads into the user's class

With ``checkpoint_dir=DIR`` every stage boundary is saved (safetensors weights + mappings + the
stage index); ``VCycle(..., resume=DIR)`` continues after the last completed stage.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from vcyclefx.api import coalesce, decoalesce, interpolate
from vcyclefx.capture.frontend import as_level
from vcyclefx.errors import ScheduleError, VCycleError
from vcyclefx.export.module import to_module
from vcyclefx.level import clone_level, is_level, level_info
from vcyclefx.plan.choices import DEPTH_INITS, DEPTH_PAIRINGS, WIDTH_PAIRINGS, one_of
from vcyclefx.plan.mapping import Mapping
from vcyclefx.store import atomic_directory, load_tensors, save_tensors
from vcyclefx.train.flops import tokens_in, training_flops_per_token
from vcyclefx.train.moments import map_moments

PHASES = ("down", "bottom", "up")
CKPT_FORMAT = "vcyclefx.vcycle"


@dataclass(frozen=True)
class StageSpec:
    index: int
    level: int
    steps: int
    lr_scale: float
    phase: str  # "down" | "bottom" | "up"


@dataclass
class Stage:
    index: int
    level: int
    model: torch.nn.Module
    steps: int
    lr_scale: float
    phase: str
    # how this stage's model was made from the previous stage's: (direction, mapping, source)
    transition: tuple | None = field(default=None, repr=False)
    _module: torch.nn.Module | None = field(default=None, repr=False, compare=False)

    def map_optimizer_state(self, state: dict[str, dict]) -> dict[str, dict]:
        """Carry per-parameter optimizer state (AdamW ``exp_avg``/``exp_avg_sq``/``step``,
        keyed by parameter name, from the previous stage's model) through this stage's
        transition. The moments follow the gradients, not the parameters (DESIGN.md, derived in
        ``vcyclefx/train/moments.py``): where de-coalescing copies a producer unit k times each copy
        gets ``exp_avg / k`` and ``exp_avg_sq / k^2``, a split consumer's parts keep both, and
        coalescing applies the inverse; block copies keep the moments of the block they copy and
        coalescing averages them. The step count is kept. The paper uses a fresh optimizer per
        stage instead (the driver carries them unless ``--no-carry-optimizer``); see BENCHMARKS.md."""
        if self.transition is None:
            return dict(state)
        direction, mapping, source = self.transition
        keys = {k for v in state.values() for k, t in v.items() if isinstance(t, torch.Tensor) and t.dim() > 0}
        mapped = map_moments(source, {k: {n: v[k] for n, v in state.items() if k in v}
                                      for k in keys}, direction, mapping)
        steps = [v["step"] for v in state.values() if "step" in v]
        out: dict[str, dict] = {}
        for name, _ in self.model.named_parameters():
            entry = {k: mapped[k][name] for k in keys if name in mapped[k]}
            if steps:
                entry["step"] = steps[0].clone() if isinstance(steps[0], torch.Tensor) else steps[0]
            out[name] = entry
        return out

    def module(self) -> torch.nn.Module:
        """This stage's model as the user's own class at this level's sizes (``vf.to_module``),
        holding the stage's own tensors: train it with any trainer (a ``transformers.Trainer``,
        Lightning) and the cycle's next transition starts from what it learned. The same object
        on every call."""
        if self._module is None:
            self._module = to_module(self.model, share=True)
        return self._module

    def __repr__(self) -> str:
        return (f"Stage(index={self.index}, level={self.level}, steps={self.steps}, "
                f"lr_scale={self.lr_scale}, phase={self.phase!r})")


class Schedule:
    """The stages of a V-cycle; ``str()`` is a table."""

    def __init__(self, stages: list[StageSpec]):
        self.stages = stages

    def __iter__(self):
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, i) -> StageSpec:
        return self.stages[i]

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def steps_per_level(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for s in self.stages:
            out[s.level] = out.get(s.level, 0) + s.steps
        return out

    def __str__(self) -> str:
        rows = [f"{'stage':>5}  {'level':>5}  {'phase':<6}  {'steps':>8}  {'lr x':>5}"]
        for s in self.stages:
            rows.append(f"{s.index:>5}  {s.level:>5}  {s.phase:<6}  {s.steps:>8}  {s.lr_scale:>5g}")
        rows.append(f"{'total':>5}  {'':>5}  {'':<6}  {self.total_steps:>8}")
        return "\n".join(rows)


def default_fractions(levels: int) -> list[float]:
    """5% per stage on the way down and up, 45% at the coarsest level, the rest at level 0 (for
    2 levels: 5% / 45% / 50%, the shape of the paper's GPT recipe)."""
    n = 2 * levels - 1
    down = [0.05] * (levels - 1)
    up = [0.05] * (levels - 2)
    rest = 1.0 - sum(down) - 0.45 - sum(up)
    out = down + [0.45] + up + [rest]
    assert len(out) == n
    return out


# At or above this many tokens per parameter (of the baseline the V-cycle replaces) the model is
# about the compute-efficient size for its budget, and the recipe that paid against the envelope
# there is a short coarse phase early (BENCHMARKS.md, "Regime map"); below it a smaller model
# trained alone is cheaper than any recipe measured.
COMPUTE_EFFICIENT_TPP = 20.0
SHORT_COARSE = (0.02, 0.08)  # down, coarsest: the rest goes to the way up


def recommended_fractions(levels: int, tokens_per_param: float | None = None) -> list[float]:
    """The measured recipe's shape, by regime (BENCHMARKS.md, "Regime map").

    ``tokens_per_param`` (the baseline's tokens over level 0's parameters) at or above
    ``COMPUTE_EFFICIENT_TPP``: a short coarse phase early, 2% of the steps on the way down, 8% at
    the coarsest level, the rest on the way up (2 levels: 2% / 8% / 90%), the only recipe measured
    at or above zero against the envelope there. Otherwise (or None): 5% per stage on the way
    down and up, the rest at the coarsest level (5% / 90% / 5%), the recipe that saves most
    against the same-size model (frontier study) but where a smaller model trained alone is
    cheaper still. Use either with ``depth_init="identity"``, ``alpha=0.75``, ``lr_scales`` 2
    below level 0, carried optimizer moments (``Stage.map_optimizer_state``), one cosine
    learning-rate decay over the whole cycle and 1.5x the baseline's steps (the driver's
    defaults)."""
    if levels > 1 and tokens_per_param is not None and tokens_per_param >= COMPUTE_EFFICIENT_TPP:
        down, bottom = SHORT_COARSE
        up = 1.0 - down - bottom
        return ([down / (levels - 1)] * (levels - 1) + [bottom]
                + [up / (levels - 1)] * (levels - 1))
    edges = 0.05 * (2 * levels - 2)
    if levels > 1 and edges >= 1.0:
        raise ScheduleError(f"levels={levels}: 5% per transition stage leaves nothing for the "
                            "coarsest level; give fractions= yourself")
    return [0.05] * (levels - 1) + [1.0 - edges] + [0.05] * (levels - 1)


def build_schedule(levels: int, *, total_steps: int | None = None, fractions=None, steps=None,
                   lr_scales=None) -> Schedule:
    if not isinstance(levels, int) or levels < 1:
        raise ScheduleError(f"levels={levels!r} must be an integer >= 1")
    n = 2 * levels - 1
    level_of = list(range(levels)) + list(range(levels - 2, -1, -1))
    phase_of = ["down"] * (levels - 1) + ["bottom"] + ["up"] * (levels - 1)
    if levels == 1:
        phase_of = ["bottom"]
    if steps is not None:
        if total_steps is not None or fractions is not None:
            raise ScheduleError("give steps=[...] or total_steps= (with fractions=), not both")
        steps = list(steps)
        if len(steps) != n:
            raise ScheduleError(f"steps has {len(steps)} entries; {levels} levels have {n} stages")
    else:
        if total_steps is None:
            raise ScheduleError("give total_steps= (split by fractions=) or steps=[per stage]")
        if not isinstance(total_steps, int) or total_steps <= 0:
            raise ScheduleError(f"total_steps={total_steps!r} must be a positive integer")
        fr = list(fractions) if fractions is not None else default_fractions(levels)
        if len(fr) != n:
            raise ScheduleError(f"fractions has {len(fr)} entries; {levels} levels have {n} stages")
        if any(f <= 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
            raise ScheduleError(f"fractions {fr} must be positive and sum to 1")
        steps = [int(round(f * total_steps)) for f in fr[:-1]]
        steps.append(total_steps - sum(steps))
    for i, s in enumerate(steps):
        if not isinstance(s, int) or s <= 0:
            raise ScheduleError(f"stage {i} (level {level_of[i]}, {phase_of[i]}) would train "
                                f"{s} steps; every stage needs at least 1 (raise total_steps or "
                                "its fraction)")
    if lr_scales is None:
        lr_scales = [1.0] + [4.0] * (levels - 1)  # the paper's GPT recipe: 4x at coarse levels
    lr_scales = list(lr_scales)
    if len(lr_scales) != levels or any(not (x > 0) for x in lr_scales):
        raise ScheduleError(f"lr_scales must give {levels} positive factors, one per level")
    return Schedule([StageSpec(i, level_of[i], steps[i], float(lr_scales[level_of[i]]), phase_of[i])
                     for i in range(n)])


class VCycle:
    def __init__(self, model, example_inputs=None, *, levels: int = 2, width: float = 0.5,
                 depth: float = 0.5, alpha: float = 0.25, total_steps: int | None = None,
                 fractions=None, steps=None, lr_scales=None, pairing: str = WIDTH_PAIRINGS[0],
                 depth_pairing: str = DEPTH_PAIRINGS[0], depth_init: str = DEPTH_INITS[0],
                 checkpoint_dir=None, resume=None,
                 write_checkpoints: bool = True, **capture_kwargs):
        if not isinstance(alpha, (int, float)) or not (0.0 <= alpha <= 1.0):
            raise ScheduleError(f"alpha={alpha!r} must be in [0, 1]")
        self.schedule = build_schedule(levels, total_steps=total_steps, fractions=fractions,
                                       steps=steps, lr_scales=lr_scales)
        self.levels, self.width, self.depth, self.alpha = levels, width, depth, float(alpha)
        if depth_init not in DEPTH_INITS:
            raise ScheduleError(f"depth_init={depth_init!r} must be {one_of(DEPTH_INITS)}")
        self.pairing, self.depth_pairing, self.depth_init = pairing, depth_pairing, depth_init
        # the cycle trains its own copy: a level passed in is never changed by the stages
        self.level0 = (clone_level(model) if is_level(model)
                       else as_level(model, example_inputs, **capture_kwargs))
        self.example_inputs = level_info(self.level0).example_inputs
        # checkpoints are written to checkpoint_dir (or to the resume directory); processes
        # other than the writer (rank != 0) pass write_checkpoints=False
        target = checkpoint_dir or resume
        self.checkpoint_dir = Path(target) if (target and write_checkpoints) else None
        self._shapes: dict[int, torch.nn.Module] = {0: self.level0}  # a module of every level
        self.mappings: dict[int, Mapping] = {}
        self._flops: dict[int, float] = {}
        self._model = self.level0
        self._kept: dict[int, torch.nn.Module] = {}
        self._next = 0
        self._last_transition = None
        self._done = False
        self._iterating = False
        # hooks for a trainer that keeps the weights elsewhere (the driver under --fsdp keeps
        # the levels on the meta device and their weights in sharded modules): a context each
        # transition runs in (it records it), and ``save_weights(path, module)``, which writes a
        # level's weights for a checkpoint; when set it is called on every process (a gather
        # may need them all), with ``path`` None where this process writes nothing
        self.transition_context = None
        self.save_weights = None
        if resume is not None and _latest(Path(resume)) is not None:
            self._resume(Path(resume))
        else:
            self._plan_levels()

    # -- levels --------------------------------------------------------------------------------
    def _plan_levels(self) -> None:
        """Coalesce the structure down to the coarsest level now, so that an impossible
        schedule fails before any training."""
        cur = self.level0
        for k in range(self.levels - 1):
            try:
                cur, m = coalesce(cur, width=self.width, depth=self.depth, pairing=self.pairing,
                                  depth_pairing=self.depth_pairing)
            except VCycleError as e:
                raise ScheduleError(f"levels={self.levels}: level {k} cannot be coalesced to level "
                                    f"{k + 1}: {e}") from e
            self.mappings[k] = m
            self._shapes[k + 1] = cur

    def held_modules(self) -> dict[str, torch.nn.Module]:
        """Every module the cycle holds, by role: ``current`` (the level of the stage in
        training, or next), ``kept<k>`` (level k's weights kept for the way up), ``shape<k>``
        (level k's module from the planning pass). One module may have several roles."""
        out = {"current": self._model}
        out.update({f"kept{k}": m for k, m in self._kept.items()})
        out.update({f"shape{k}": m for k, m in self._shapes.items()})
        return out

    def level_module(self, level: int) -> torch.nn.Module:
        """A module with the shapes of ``level`` (weights from the planning pass)."""
        return self._shapes[level]

    def flops_per_token(self, level: int) -> float:
        """Training (forward + backward) FLOPs per token of ``level``, from its graph."""
        if level not in self._flops:
            m = clone_level(self._shapes[level])
            self._flops[level] = training_flops_per_token(m, self.example_inputs)
        return self._flops[level]

    # -- iteration ------------------------------------------------------------------------------
    @property
    def next_stage(self) -> int:
        """Index of the stage iteration yields next (after ``resume=DIR``: the first stage not
        completed; ``len(schedule)`` once every stage ran)."""
        return self._next

    def __iter__(self):
        if self._iterating:
            raise ScheduleError("this VCycle is already being iterated; make a new one "
                                "(or pass resume=DIR to continue a checkpointed one)")
        self._iterating = True
        prev_level = self.schedule[self._next - 1].level if self._next > 0 else 0
        for index in range(self._next, len(self.schedule)):
            spec = self.schedule[index]  # read when reached: end_stage_early may change it
            hook = self.transition_context
            with hook() if hook is not None else contextlib.nullcontext():
                self._transition(prev_level, spec.level)
            prev_level = spec.level
            yield Stage(spec.index, spec.level, self._model, spec.steps, spec.lr_scale, spec.phase,
                        self._last_transition)
            self._next = spec.index + 1
            if self.checkpoint_dir is not None or self.save_weights is not None:
                self._checkpoint(spec.index)
        self._done = True

    def end_stage_early(self, index: int, steps_done: int) -> None:
        """Stage ``index`` (the one being trained) ends after ``steps_done`` of its steps, e.g.
        when a growth criterion says the coarse level has stopped paying (the driver's
        ``--grow-when slope``); the steps it leaves go to the next stage, so the schedule's total
        is unchanged. Call it before asking the iteration for the next stage."""
        if index != self._next or not 1 <= steps_done <= self.schedule[index].steps:
            raise ScheduleError(f"end_stage_early({index}, {steps_done}): stage {self._next} is "
                                f"the one in training, with {self.schedule[self._next].steps} steps")
        if index + 1 >= len(self.schedule):
            raise ScheduleError("end_stage_early: the last stage has no next stage to take its steps")
        st, nxt = self.schedule[index], self.schedule[index + 1]
        self.schedule.stages[index] = replace(st, steps=steps_done)
        self.schedule.stages[index + 1] = replace(nxt, steps=nxt.steps + st.steps - steps_done)

    def _transition(self, frm: int, to: int) -> None:
        self._last_transition = None
        if to == frm:
            return
        source = self._model
        if to == frm + 1:
            self._kept[frm] = self._model
            mapping = self.mappings[frm]
            if self.pairing == "similarity":  # groups depend on the trained weights
                small, mapping = coalesce(self._model, width=self.width, depth=self.depth,
                                          pairing=self.pairing, depth_pairing=self.depth_pairing)
                self.mappings[frm] = mapping
            else:
                small, _ = coalesce(self._model, mapping=mapping)
            self._model = small
            self._last_transition = ("coalesce", mapping, source)
        elif to == frm - 1:
            big, _ = decoalesce(self._model, mapping=self.mappings[to],
                                depth_init=self.depth_init)
            self._model = interpolate(self._kept.pop(to), big, self.alpha)
            self._last_transition = ("decoalesce", self.mappings[to], source)
        else:
            raise ScheduleError(f"stage moves from level {frm} to {to}; a V-cycle moves one level")

    def result(self, as_module: bool = False) -> torch.nn.Module:
        """The level-0 model after the last stage (its state_dict loads into the user's class);
        with ``as_module=True`` an instance of the user's class holding its tensors
        (``vf.to_module``; for Hugging Face models ``save_pretrained`` works on it)."""
        if not self._done:
            raise ScheduleError(f"the cycle has run {self._next} of {len(self.schedule)} stages; "
                                "iterate it to the end first")
        if as_module:
            return to_module(self._model, share=True)
        return self._model

    # -- reporting ------------------------------------------------------------------------------
    def report(self, tokens_per_step: int | None = None) -> str:
        """Stages, steps, FLOPs and the ratio to training level 0 for the same steps."""
        tps = tokens_per_step or tokens_in(self.example_inputs)
        f0 = self.flops_per_token(0)
        rows = [f"{'stage':>5}  {'level':>5}  {'phase':<6}  {'steps':>7}  {'params':>11}  "
                f"{'FLOPs/token':>12}  {'stage FLOPs':>12}"]
        total = 0.0
        for s in self.schedule:
            f = self.flops_per_token(s.level)
            stage_flops = f * s.steps * tps
            total += stage_flops
            n = sum(p.numel() for p in self._shapes[s.level].parameters())
            rows.append(f"{s.index:>5}  {s.level:>5}  {s.phase:<6}  {s.steps:>7}  {n:>11,}  "
                        f"{f:>12.4g}  {stage_flops:>12.4g}")
        base = f0 * self.schedule.total_steps * tps
        rows.append(f"total training FLOPs {total:.4g} = {total / base:.3f} x level 0 for the same "
                    f"{self.schedule.total_steps} steps ({tps} tokens per step)")
        return "\n".join(rows)

    def total_flops(self, tokens_per_step: int) -> float:
        return sum(self.flops_per_token(s.level) * s.steps * tokens_per_step for s in self.schedule)

    # -- checkpoints ------------------------------------------------------------------------------
    def _checkpoint(self, index: int) -> None:
        save = self.save_weights or _save_weights
        if self.checkpoint_dir is None:  # a process that writes nothing, where save_weights
            save(None, self._model)      # needs every process
            for m in self._kept.values():
                save(None, m)
            return
        with atomic_directory(self.checkpoint_dir / f"stage-{index:03d}") as tmp:
            save(tmp / "model.safetensors", self._model)
            for k, m in self._kept.items():
                save(tmp / f"kept-level{k}.safetensors", m)
            for k, m in self.mappings.items():
                m.save(tmp / f"mapping-level{k}.json")
            meta = {"format": CKPT_FORMAT, "completed_stage": index, "next_stage": index + 1,
                    "level": self.schedule[index].level, "kept": sorted(self._kept),
                    "schedule": [asdict(s) for s in self.schedule],
                    "config": {"levels": self.levels, "width": self.width, "depth": self.depth,
                               "alpha": self.alpha, "pairing": self.pairing,
                               "depth_pairing": self.depth_pairing,
                               "depth_init": self.depth_init}}
            (tmp / "cycle.json").write_text(json.dumps(meta, indent=1))

    def _resume(self, root: Path) -> None:
        ckpt = _latest(root)
        meta = json.loads((ckpt / "cycle.json").read_text())
        saved_sched = [StageSpec(**s) for s in meta["schedule"]]
        if saved_sched != self.schedule.stages:
            raise ScheduleError(f"resume={root}: the checkpoint was made with another schedule; "
                                "construct the VCycle with the same levels/steps/fractions")
        cfg = meta["config"]
        for key in ("levels", "width", "depth", "alpha", "pairing", "depth_pairing", "depth_init"):
            if cfg.get(key, DEPTH_INITS[0] if key == "depth_init" else None) != getattr(self, key):
                raise ScheduleError(f"resume={root}: checkpoint has {key}={cfg[key]!r}, this "
                                    f"VCycle {key}={getattr(self, key)!r}")
        for k in range(self.levels - 1):
            self.mappings[k] = Mapping.load(ckpt / f"mapping-level{k}.json")
            self._shapes[k + 1], _ = coalesce(self._shapes[k], mapping=self.mappings[k])
        self._model = _load_into(self._shapes[meta["level"]], ckpt / "model.safetensors")
        for k in meta["kept"]:
            self._kept[k] = _load_into(self._shapes[k], ckpt / f"kept-level{k}.safetensors")
        self._next = meta["next_stage"]
        self._done = self._next >= len(self.schedule)


def _save_weights(path: Path, module: torch.nn.Module) -> None:
    save_tensors(path, module.state_dict(keep_vars=True))


def _load_into(shape_module, path: Path):
    """A copy of ``shape_module`` with the weights of ``path``. A checkpoint written before the
    alias map was stored has one name per tied tensor; the others may be missing where the
    module ties them to a stored name."""
    m = clone_level(shape_module)
    state = load_tensors(path)
    missing, unexpected = m.load_state_dict(state, strict=False)
    aliases = {k for k in missing if k not in state}
    named = dict(m.state_dict(keep_vars=True))
    still = [k for k in aliases if not any(named[k] is named[s] for s in state if s in named)]
    if still or unexpected:
        raise VCycleError(f"{path}: weights do not fit the level (missing {still[:3]}, "
                          f"unexpected {unexpected[:3]})")
    return m


def _latest(root: Path) -> Path | None:
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("stage-*") if (p / "cycle.json").is_file())
    return done[-1] if done else None

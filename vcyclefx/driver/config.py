"""Configuration of the training driver: one typed, frozen dataclass and its presets.

Every field carries a one-line reason (``metadata["help"]``); the command line is built from
these fields (``driver/cli.py``), so ``vcyclefx train --help`` explains every option. Unknown keys
are rejected with the closest known name. Checks that need the runtime (is CUDA there, how many
processes) live in ``check_runtime`` and fail at start-up with a message that says the fix.

This module imports only the standard library: the CLI imports it to build ``--help``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import warnings
from dataclasses import dataclass, field

from vcyclefx.errors import VCycleError
from vcyclefx.plan.choices import DEPTH_INITS, DEPTH_PAIRINGS, WIDTH_PAIRINGS

SCHEDULES = ("vcycle", "baseline", "compare")
LR_SCHEDULES = ("global", "stage", "wsd")
DTYPES = ("auto", "float32", "bfloat16")
LOG_TO = ("jsonl", "tensorboard")
GROW_WHEN = ("fractions", "slope")
LR_AT_GROWTH = ("schedule", "same-loss")
COARSE_LR_SCALE = 2.0  # lr factor of the coarse levels when --lr-scales is not given (tuned)


class ConfigError(VCycleError):
    """A training option is unknown, out of range, or unsupported with the others given."""


def _f(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class TrainConfig:
    # --- model (a GPT-2 style causal LM, vcyclefx.zoo.gpt.GPT, unless --model names another) ---
    model: str = _f("", "causal LM architecture to train instead of the built-in GPT: a Hugging "
                        "Face config.json or model directory (random weights, vocabulary from "
                        "the data) or a pkg.mod:factory(vocab_size=, seq_len=) returning a "
                        "module; --n-layer/--n-head/--n-embd/--bias then do not apply")
    n_layer: int = _f(4, "transformer blocks of level 0 (the model you want at the end)")
    n_head: int = _f(4, "attention heads of level 0; n_embd must be a multiple of it")
    n_embd: int = _f(128, "residual stream width of level 0")
    dropout: float = _f(0.0, "dropout probability (0 as in nanoGPT pre-training)")
    bias: bool = _f(True, "biases in Linear and LayerNorm, as GPT-2")
    vocab_size: int = _f(0, "vocabulary size; 0 = from the data (256 for bytes, max id + 1 "
                            "rounded up to 64 for token files)")
    # --- data ---
    data: str = _f("", "text file, folder of text files, or token file (.npy uint8/16/32; .bin "
                       "raw uint16, or uint8/uint32 when the name contains that word); empty = the "
                       "Python standard library source as bytes; python-site = every .py file "
                       "of the interpreter's path (stdlib and site-packages), split by file")
    cache_dir: str = _f("", "where the tokenised corpus is cached; empty = $VCYCLEFX_CACHE or "
                            "~/.cache/vcyclefx")
    val_fraction: float = _f(0.05, "share of files (or of the tail of a single file) held out for "
                                   "validation")
    seq_len: int = _f(128, "tokens per training sequence (also the model's position table size)")
    batch_size: int = _f(16, "sequences per micro-batch on each process")
    grad_accum: int = _f(1, "micro-batches per optimizer step over ALL processes (divided by the "
                            "world size), so global batch = batch_size * grad_accum")
    # --- optimisation (nanoGPT: AdamW, cosine with warm-up, clipping) ---
    steps: int = _f(800, "optimizer steps of the baseline (and of the V-cycle unless "
                         "--vcycle-steps is given)")
    lr: float = _f(6e-3, "peak learning rate of level 0 (stage lr = lr * the stage's lr scale); "
                         "6e-3 is the tiny preset's tuned value (BENCHMARKS.md)")
    min_lr: float = _f(6e-4, "learning rate at the end of the cosine decay (lr / 10)")
    warmup: int = _f(50, "linear warm-up steps at the start of a schedule")
    lr_schedule: str = _f("global", "global: one warm-up + cosine over all the V-cycle's steps, "
                                    "the stage's lr scale on top (measured best, BENCHMARKS.md); "
                                    "stage: every V-cycle stage its own warm-up + cosine over its "
                                    "steps, as the authors' separate run per stage",
                          choices=LR_SCHEDULES)
    decay_fraction: float = _f(0.2, "--lr-schedule wsd (warm-up, stable, decay: one schedule over "
                                    "all the V-cycle's steps like global): the share of the "
                                    "steps at the end that decay linearly to --min-lr; the lr "
                                    "is --lr before that")
    lr_at_growth: str = _f("schedule", "the learning rate of the last stage, after the V-cycle "
                                       "grows back to the full model: schedule (where the "
                                       "run's schedule is) or same-loss (staged training: "
                                       "continue as a from-scratch full model that has reached "
                                       "the grown model's validation loss, read off the full "
                                       "model's frontier, with the stage's steps left: needs "
                                       "the frontier, --schedule compare or --grow-frontier)",
                           choices=LR_AT_GROWTH)
    stage_warmup: int = _f(0, "warm-up steps at the start of every later V-cycle stage (0 as the "
                              "paper: the optimizer is reset but not warmed up)")
    weight_decay: float = _f(0.01, "AdamW weight decay on matrices, as the paper")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2 (nanoGPT)")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 = off")
    # --- schedule ---
    schedule: str = _f("vcycle", "vcycle, baseline, or compare (the baseline at every "
                                 "--frontier-budgets budget, then the V-cycle; same data order "
                                 "and init)", choices=SCHEDULES)
    frontier_budgets: tuple[float, ...] = _f((0.75, 1.0, 1.5), "baseline budgets of --schedule compare "
                                             "as multiples of --steps, each with its own warm-up "
                                             "and full cosine decay; the V-cycle's effective "
                                             "saving is read off their frontier (1 must be one)",
                                             parse="floats")
    coarse_budgets: tuple[float, ...] = _f((1.0, 2.0, 4.0), "budgets of each coarser level's "
                                           "architecture trained ALONE in --schedule compare "
                                           "(built-in GPT only), as multiples of --steps (its "
                                           "steps cost less); with the baselines they make the "
                                           "envelope the V-cycle is also scored against; empty "
                                           "= none", parse="floats")
    alone_sizes: str = _f("", "more sizes of the built-in GPT trained ALONE in --schedule "
                              "compare, for the envelope: LAYERSxWIDTHxHEADS, comma-separated "
                              "(e.g. 1x32x2: for a 2 x 32 model, the coarse architecture of "
                              "--width 1, a size a user could train instead), each at "
                              "--coarse-budgets and --lr x the coarse lr scale; empty = none")
    levels: int = _f(2, "levels of the V-cycle (2 = one coalesced level below the model)")
    width: float = _f(0.5, "width factor from one level to the next smaller one")
    depth: float = _f(0.5, "depth factor from one level to the next smaller one")
    alpha: float = _f(0.75, "interpolation weight of the de-coalesced model (the paper: 0.25 for "
                            "GPT; 0.75 measured best with identity growth, BENCHMARKS.md); 1 "
                            "keeps duplicated width units identical for ever (a half-width model "
                            "in the full shape)")
    vcycle_steps: int = _f(0, "optimizer steps of the V-cycle, split among its stages; 0 = "
                              "--vcycle-budget x --steps")
    vcycle_budget: float = _f(1.5, "V-cycle steps as a multiple of --steps when --vcycle-steps is "
                                   "0 (its FLOPs are counted in full; 1.5 measured best, the "
                                   "paper's GPT recipe uses 1.05)")
    fractions: tuple[float, ...] = _f((), "share of the V-cycle's steps per stage, comma-separated "
                                          "(2 levels: down,bottom,up); empty = 5% per stage on "
                                          "the way down and up, the rest at the coarsest level "
                                          "(0.05,0.9,0.05; measured best, BENCHMARKS.md; the "
                                          "paper's GPT recipe: 0.05,0.45,0.5)", parse="floats")
    grow_when: str = _f("fractions", "when the V-cycle leaves its coarsest level: fractions (after "
                                     "its --fractions share) or slope (as soon as the coarse "
                                     "level's validation loss falls more slowly per FLOP than "
                                     "the full model's frontier at the same loss, read from this "
                                     "run's own curve; its --fractions share is then the most it "
                                     "may take, and the steps left go to the way up; needs the "
                                     "frontier: --schedule compare or --grow-frontier)",
                         choices=GROW_WHEN)
    grow_frontier: str = _f("", "the full model's frontier for --grow-when slope and "
                                "--lr-at-growth same-loss: a JSON "
                                "{\"points\": [[flops, loss], ...]} or a compare run's summary.json; "
                                "empty = this run's own baselines (--schedule compare)")
    grow_window: int = _f(4, "evaluations the coarse level's slope is fitted over "
                             "(--grow-when slope); evaluations are --eval-every steps apart")
    lr_scales: tuple[float, ...] = _f((), "learning-rate factor per level, comma-separated (level "
                                          "0 first); empty = 1 at level 0 and 2 below (tuned; "
                                          "the paper's GPT recipe uses 4)", parse="floats")
    pairing: str = _f("strided", "which width units are coalesced together: strided (i with i + "
                                 "n/2, the paper), adjacent (2i, 2i+1), or similarity (most "
                                 "similar weights, chosen at each coalescing)", choices=WIDTH_PAIRINGS)
    depth_pairing: str = _f("adjacent", "which blocks are coalesced together: adjacent (2i, "
                                        "2i+1, the paper) or strided (i with i + L/2)",
                            choices=DEPTH_PAIRINGS)
    depth_init: str = _f("identity", "how de-coalescing fills the new blocks: identity (their last "
                                     "residual writes zeroed, so the de-coalesced model computes "
                                     "the coarse level's function) or copy (the paper)",
                         choices=DEPTH_INITS)
    carry_optimizer: bool | None = _f(None, "carry the AdamW moments through every coalesce/de-"
                                            "coalesce, as the gradients move "
                                            "(Stage.map_optimizer_state), instead of a fresh "
                                            "optimizer per stage (the paper); default: on (under "
                                            "--fsdp mapped one parameter at a time, see "
                                            "--fsdp-transitions)")
    # --- runtime ---
    out: str = _f("", "output directory; empty = runs/<timestamp>", short="-o")
    resume: str = _f("", "resume the run in this directory from its latest checkpoint")
    seed: int = _f(1337, "seed of the initial weights and of the data order")
    device: str = _f("auto", "cpu, cuda, cuda:N, or auto (cuda when available; LOCAL_RANK picks "
                             "the GPU under torchrun)")
    dtype: str = _f("auto", "float32 or bfloat16 autocast; auto = bfloat16 on CUDA, float32 on CPU",
                    choices=DTYPES)
    compile: bool | None = _f(None, "torch.compile the module being trained (default: on CUDA yes, "
                                    "on CPU no)")
    eval_every: int = _f(50, "evaluate the validation loss every this many steps (and at the end "
                             "of every stage)")
    eval_batches: int = _f(10, "micro-batches per validation estimate (the same batches every "
                               "time)")
    log_every: int = _f(10, "write a training record every this many steps")
    ckpt_every: int = _f(200, "write a checkpoint every this many steps (and at every stage end); "
                              "0 = only at stage ends")
    fsdp: bool = _f(False, "shard weights, gradients and optimizer state over the processes "
                           "(FSDP2 fully_shard) instead of DDP, for models that do not fit one GPU")
    fsdp_transitions: str = _f("tensor", "how a V-cycle transition maps the sharded weights and "
                                         "AdamW moments under --fsdp: tensor (one parameter's "
                                         "group gathered at a time, the levels kept on the meta "
                                         "device) or whole (every rank gathers the whole level; "
                                         "the reference the first is tested against)",
                               choices=("tensor", "whole"))
    cpu_offload: bool = _f(False, "with --fsdp on CUDA: keep the sharded parameters, gradients and "
                                  "optimizer state in CPU memory (FSDP2 CPUOffloadPolicy; the "
                                  "optimizer steps on the CPU), for levels whose shards do not "
                                  "fit the GPUs")
    peak_flops: float = _f(989e12, "peak FLOP/s of one device for MFU (H100 SXM bf16 dense)")
    quiet: bool = _f(False, "no progress bar")
    log_to: str = _f("jsonl", "jsonl: metrics.jsonl only; tensorboard: also TensorBoard event "
                              "files in <out>/tensorboard/<schedule>/ (loss, val loss, lr, tokens, "
                              "FLOPs, level; every stage start as text), written locally, nothing "
                              "remote", choices=LOG_TO)

    def __post_init__(self):
        for name in ("fractions", "lr_scales", "frontier_budgets", "coarse_budgets"):  # JSON gives lists, the command line strings
            object.__setattr__(self, name, parse_floats(getattr(self, name), name))
        _check_ranges(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build a config from a dict; unknown keys are an error that names the closest key."""
        names = cls.field_names()
        for key in d:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown training option {key!r}{hint}; known: {', '.join(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    @property
    def vcycle_total_steps(self) -> int:
        return self.vcycle_steps or max(1, round(self.vcycle_budget * self.steps))

    @property
    def carries_optimizer(self) -> bool:
        """``--carry-optimizer`` as given, else on (also with ``--fsdp``)."""
        return self.carry_optimizer is not False

    def tokens_per_param(self, params: int | None) -> float | None:
        """The baseline's tokens (``--steps``) per parameter of level 0 (None without ``params``)."""
        return None if not params else self.steps * self.tokens_per_step / params

    def vcycle_fractions(self, params: int | None = None) -> list[float]:
        """``--fractions``, else the recommended shape for the regime: level 0's ``params`` and
        ``--steps`` give the tokens per parameter (``vcyclefx.train.vcycle.recommended_fractions``)."""
        # imported here: every `vcyclefx` command builds the train parser from this module,
        # and the V-cycle's module imports the passes and torch's FLOP counter (0.1-0.2 s)
        from vcyclefx.train.vcycle import recommended_fractions

        return list(self.fractions) or recommended_fractions(self.levels,
                                                             self.tokens_per_param(params))

    def alone_size_list(self) -> list[tuple[str, tuple[int, int, int]]]:
        """``--alone-sizes`` as ``[("1x32x2", (n_layer, n_head, n_embd))]`` (checked)."""
        return [parse_alone_size(x) for x in self.alone_sizes.split(",") if x.strip()]

    def alone_lr_scale(self, key: int | str) -> float:
        """The lr scale of an architecture trained alone: level k's (``alone-L<k>``), or the
        coarse scale for an ``--alone-sizes`` one."""
        scales = self.vcycle_lr_scales()
        if isinstance(key, int):
            return scales[key]
        return scales[1] if len(scales) > 1 else COARSE_LR_SCALE

    def vcycle_lr_scales(self) -> list[float]:
        """``--lr-scales``, else 1 at level 0 and ``COARSE_LR_SCALE`` at every coarser level."""
        return list(self.lr_scales) or [1.0] + [COARSE_LR_SCALE] * (self.levels - 1)


def parse_alone_size(text: str) -> tuple[str, tuple[int, int, int]]:
    """An ``--alone-sizes`` entry ``LAYERSxWIDTHxHEADS`` -> (its key, (n_layer, n_head,
    n_embd)); a ``ConfigError`` that shows the form otherwise."""
    try:
        n_layer, n_embd, n_head = (int(x) for x in text.strip().lower().split("x"))
        if min(n_layer, n_embd, n_head) < 1 or n_embd % n_head:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--alone-sizes {text.strip()!r}: give LAYERSxWIDTHxHEADS with the width "
                          "a multiple of the heads, e.g. 1x32x2") from None
    return f"{n_layer}x{n_embd}x{n_head}", (n_layer, n_head, n_embd)


def parse_floats(value, name: str = "value") -> tuple[float, ...]:
    """``"0.05,0.45,0.5"`` or a list/tuple of numbers -> a tuple of floats (empty -> ())."""
    if isinstance(value, str):
        parts = [x.strip() for x in value.split(",") if x.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise ConfigError(f"--{_opt(name)} takes comma-separated numbers, got {value!r}")
    try:
        return tuple(float(x) for x in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"--{_opt(name)} takes comma-separated numbers like 0.1,0.4,0.5, "
                          f"got {value!r}") from None


# Presets: overrides of the dataclass defaults. `tiny` is the dataclass default itself: 4 x 128
# (0.8M parameters), 800 steps of 16 x 128 tokens. Measured on this project's 2-core machine:
# 0.34 s a step at batch 32 with the machine lightly shared (so ~0.17 s at 16, ~2.5 min for the
# baseline), over 1 s a step when it is shared 3-4 ways; the validation loss falls from 5.35 to
# 1.91. `--schedule compare` (baseline + the cheaper V-cycle) thus stays inside ~12 minutes
# unless the machine is heavily shared.
PRESETS: dict[str, dict] = {
    "tiny": {},
    "small": dict(n_layer=6, n_head=6, n_embd=384, seq_len=256, batch_size=32, steps=5000,
                  lr=1e-3, min_lr=1e-4, warmup=200, eval_every=250, eval_batches=20,
                  ckpt_every=1000),
    # GPT-2 124M; global batch 512 x 1024 as the authors' recipe: 32 x 16 micro-batches (on one
    # H100, bf16, compiled: 40.5% MFU at micro-batch 32 vs 38.3% at 16; BENCHMARKS.md).
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, seq_len=1024, batch_size=32, grad_accum=16,
                 steps=100_000, lr=1e-4, min_lr=1e-5, warmup=5000, eval_every=1000,
                 eval_batches=50, ckpt_every=2000, log_every=10),
}


def preset(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return TrainConfig.from_dict({**PRESETS[name], **overrides})


def _check_ranges(c: TrainConfig) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    for name in ("n_layer", "n_head", "n_embd", "seq_len", "batch_size", "grad_accum", "steps",
                 "eval_batches", "log_every"):
        need(getattr(c, name) >= 1, f"--{_opt(name)} must be at least 1, got {getattr(c, name)}")
    for name in ("warmup", "stage_warmup", "eval_every", "ckpt_every", "vocab_size"):
        need(getattr(c, name) >= 0, f"--{_opt(name)} must be >= 0, got {getattr(c, name)}")
    need(c.n_embd % c.n_head == 0,
         f"--n-embd {c.n_embd} is not a multiple of --n-head {c.n_head}: pick n_embd = k * n_head")
    need(c.schedule in SCHEDULES, f"--schedule {c.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    need(c.lr_schedule in LR_SCHEDULES,
         f"--lr-schedule {c.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
    need(c.dtype in DTYPES, f"--dtype {c.dtype!r}: choose one of {', '.join(DTYPES)}")
    need(c.log_to in LOG_TO, f"--log-to {c.log_to!r}: choose one of {', '.join(LOG_TO)}")
    need(0.0 <= c.dropout < 1.0, f"--dropout must be in [0, 1), got {c.dropout}")
    need(0.0 < c.val_fraction < 1.0, f"--val-fraction must be in (0, 1), got {c.val_fraction}")
    need(c.lr > 0 and 0 <= c.min_lr <= c.lr,
         f"need 0 <= --min-lr <= --lr and --lr > 0, got lr={c.lr}, min_lr={c.min_lr}")
    need(c.weight_decay >= 0 and c.grad_clip >= 0, "--weight-decay and --grad-clip must be >= 0")
    need(0 <= c.beta1 < 1 and 0 <= c.beta2 < 1, "--beta1/--beta2 must be in [0, 1)")
    need(c.levels >= 1, f"--levels must be at least 1 (1 = no coarse level), got {c.levels}")
    need(0 < c.width <= 1 and 0 < c.depth <= 1,
         f"--width/--depth are shrink factors in (0, 1], got width={c.width}, depth={c.depth}")
    need(0 <= c.alpha <= 1, f"--alpha must be in [0, 1], got {c.alpha}")
    need(c.peak_flops > 0, "--peak-flops must be positive")
    need(c.vocab_size == 0 or c.vocab_size >= 2, "--vocab-size must be 0 (from data) or >= 2")
    need(c.vcycle_steps >= 0,
         f"--vcycle-steps must be >= 0 (0 = --vcycle-budget x --steps), got {c.vcycle_steps}")
    need(c.vcycle_budget > 0, f"--vcycle-budget must be positive, got {c.vcycle_budget}")
    need(c.pairing in WIDTH_PAIRINGS,
         f"--pairing {c.pairing!r}: choose one of {', '.join(WIDTH_PAIRINGS)}")
    need(c.depth_init in DEPTH_INITS,
         f"--depth-init {c.depth_init!r}: choose one of {', '.join(DEPTH_INITS)}")
    need(c.depth_pairing in DEPTH_PAIRINGS,
         f"--depth-pairing {c.depth_pairing!r}: choose one of {', '.join(DEPTH_PAIRINGS)}")
    n = 2 * c.levels - 1
    if c.fractions:
        need(len(c.fractions) == n,
             f"--fractions has {len(c.fractions)} entries but --levels {c.levels} makes {n} "
             f"stages: give {n} (down..., bottom, up...)"
             + (f" or --levels {(len(c.fractions) + 1) // 2}" if len(c.fractions) % 2 else ""))
        need(all(f > 0 for f in c.fractions) and abs(sum(c.fractions) - 1) <= 1e-6,
             f"--fractions {','.join(map(str, c.fractions))} must be positive and sum to 1 (they "
             f"sum to {sum(c.fractions):g})")
    need(1.0 in c.frontier_budgets and all(b > 0 for b in c.frontier_budgets)
         and len(set(c.frontier_budgets)) == len(c.frontier_budgets),
         f"--frontier-budgets {','.join(map(str, c.frontier_budgets))} must be distinct positive "
         "multiples of --steps and include 1 (the baseline of --steps), e.g. 1,1.5")
    need(all(b > 0 for b in c.coarse_budgets) and len(set(c.coarse_budgets)) == len(c.coarse_budgets),
         f"--coarse-budgets {','.join(map(str, c.coarse_budgets))} must be distinct positive "
         "multiples of --steps, e.g. 1,2,4 (or empty for none)")
    sizes = c.alone_size_list()
    need(not (sizes and c.model), "--alone-sizes builds the built-in GPT at other sizes; it does "
                                  "not apply to --model")
    need(len({k for k, _ in sizes}) == len(sizes), f"--alone-sizes {c.alone_sizes}: a size is "
                                                   "given twice")
    need(c.grow_when in GROW_WHEN, f"--grow-when {c.grow_when!r}: choose one of {', '.join(GROW_WHEN)}")
    need(c.grow_window >= 2, f"--grow-window must be at least 2 evaluations, got {c.grow_window}")
    need(0.0 < c.decay_fraction <= 1.0, f"--decay-fraction must be in (0, 1], got {c.decay_fraction}")
    need(c.lr_at_growth in LR_AT_GROWTH,
         f"--lr-at-growth {c.lr_at_growth!r}: choose one of {', '.join(LR_AT_GROWTH)}")
    if c.lr_at_growth == "same-loss" and c.schedule != "baseline":
        need(bool(c.grow_frontier) or (c.schedule == "compare" and len(c.frontier_budgets) >= 2),
             "--lr-at-growth same-loss reads the full model's frontier: run --schedule compare "
             "(with 2 or more --frontier-budgets) or give --grow-frontier FILE")
    if c.grow_when == "slope" and c.schedule != "baseline":
        need(bool(c.grow_frontier) or (c.schedule == "compare" and len(c.frontier_budgets) >= 2),
             "--grow-when slope compares the coarse level's slope with the full model's "
             "frontier: run --schedule compare (with 2 or more --frontier-budgets) or give "
             "--grow-frontier FILE")
        need(c.eval_every > 0, "--grow-when slope reads the evaluations: set --eval-every > 0")
        need(not c.resume, "--resume of a --grow-when slope run is not supported (the stage "
                           "where it grew is not checkpointed yet): start it again")
    if c.lr_scales:
        need(len(c.lr_scales) == c.levels and all(x > 0 for x in c.lr_scales),
             f"--lr-scales needs {c.levels} positive factors, one per level (level 0 first), got "
             f"{','.join(map(str, c.lr_scales))}")


def _opt(name: str) -> str:
    return name.replace("_", "-")


def check_runtime(c: TrainConfig, device_type: str, world_size: int) -> None:
    """Start-up checks that depend on the machine; each failure says the fix. They run before
    the output directory is made, so a refused run writes nothing."""
    if c.cpu_offload and device_type != "cuda":
        raise ConfigError(f"--cpu-offload moves FSDP2's shards from GPU memory to CPU memory, and "
                          f"this run is on {device_type} (no GPU): drop --cpu-offload, or run on "
                          "CUDA GPUs with --fsdp --device cuda")
    if c.cpu_offload and not c.fsdp:
        raise ConfigError("--cpu-offload is FSDP2's CPU offload of the sharded parameters, "
                          "gradients and optimizer state: add --fsdp (under torchrun "
                          "--nproc_per_node N), or drop --cpu-offload")
    # a --fsdp run resumed on one process trains unsharded and keeps its checkpoint format
    if c.fsdp and world_size < 2 and not c.resume:
        raise ConfigError("--fsdp shards over processes, and this is a single process: launch with "
                          "torchrun --nproc_per_node N (N >= 2), or drop --fsdp")
    if c.grad_accum % world_size:
        raise ConfigError(
            f"--grad-accum {c.grad_accum} is not divisible by the {world_size} processes: use a "
            f"multiple of {world_size} (grad_accum counts micro-batches over all processes)"
        )
    if c.dtype == "bfloat16" and device_type == "cpu":
        # Allowed: CPU autocast supports bfloat16, and it is the way to try the GPU numerics on a
        # laptop. It is slow on CPUs without bf16 matrix units, hence the warning.
        warnings.warn("--dtype bfloat16 on CPU runs under CPU autocast: usually slower than "
                      "float32 unless the CPU has bf16 units (AMX/AVX512-BF16)", stacklevel=2)
    if c.compile and device_type == "cpu":
        warnings.warn("--compile on CPU uses inductor's C++ backend: the first steps of every "
                      "level spend tens of seconds compiling; use --no-compile for short runs",
                      stacklevel=2)
    if c.alpha == 1.0 and c.width < 1.0 and c.schedule != "baseline":
        warnings.warn("--alpha 1 with --width below 1: the de-coalesced model's duplicated width "
                      "units get identical gradients, so they stay identical for ever (a "
                      "half-width model in the full shape; BENCHMARKS.md); use --alpha below 1",
                      stacklevel=2)

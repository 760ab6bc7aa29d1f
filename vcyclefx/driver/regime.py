"""Is the requested model the compute-efficient size for its tokens? What the driver tells users.

A growth or multi-level schedule is worth running only if it beats every size the user could
have trained instead (the *envelope*, ``driver.saving.Envelope``), not just the model they asked
for. Where that model sees few tokens per parameter it is too big for its budget: a smaller model
trained alone reaches the same loss for less, and a V-cycle "saves" against the big model merely
by spending most of its steps at a small size. Before anything is measured the tokens per
parameter say which regime a run is in; a ``--schedule compare`` run measures the envelope and
its verdict says which size is best (``driver.plot.verdict``).

``COMPUTE_EFFICIENT_TPP``: Hoffmann et al. (2022) put the compute-optimal budget of a model
near 20 tokens per parameter; on this project's CPU the 225K-parameter 4 x 64 GPT overtook its
coarse level (2 x 32) trained alone at about 24 (issue 26, one seed), while the tiny 38K-parameter
2 x 32 GPT was still beaten by its 1 x 16 coarse architecture at 25 (BENCHMARKS.md, "Regime
map"): the threshold moves with scale, so the note is a warning, and only the envelope measured
by ``--schedule compare`` says which size is compute-efficient.
"""

from __future__ import annotations

import torch

from vcyclefx.train.vcycle import COMPUTE_EFFICIENT_TPP, recommended_fractions

# what the regime map measured (BENCHMARKS.md, "Regime map": a 38K-parameter GPT on a 2-core CPU,
# 3 seeds, every baseline budget's lr tuned per seed; median [min, max])
MEASURED_BELOW = ("on a 38K-parameter GPT (BENCHMARKS.md, 'Regime map') the 5/90/5 recipe saved "
                  "44.0% against the same-size model at 25 tokens per parameter but cost 37.0% "
                  "[20.9%, 49.3%] more than the coarse architecture trained alone")
MEASURED_ABOVE = ("on a 38K-parameter GPT (BENCHMARKS.md, 'Regime map', 3 seeds) this recipe "
                  "cost 64.5% [60.4%, 85.5%] more FLOPs than the envelope of the sizes trained "
                  "alone (the full model, its coarse architecture and the 1 x 32 GPT, the "
                  "cheapest there) at 25 tokens per parameter and 31.2% [28.4%, 37.3%] at 60; "
                  "the least costly recipe measured, depth-only growth (--width 1), cost 38.1% "
                  "and 2.6% [-11.8%, +4.0%]; at 150, against the full model (the envelope of the "
                  "sizes measured there), 2/8/90 cost 12.5% [8.3%, 21.2%] and depth-only saved "
                  "5.3% [-2.1%, +9.0%]: no recipe paid against every size beyond the seed noise. "
                  "Training one model from scratch, train the right size instead; the V-cycle's "
                  "transforms pay for reusing a trained model (BENCHMARKS.md)")


def coarse_params(cfg) -> int | None:
    """Parameters of level 1's architecture trained alone (the built-in GPT at the coarse sizes,
    built on the meta device: nothing allocated); None for ``--model`` or a 1-level run."""
    if cfg.model or cfg.levels < 2:
        return None
    from vcyclefx.driver.startup import built_in_gpt

    with torch.device("meta"):
        m = built_in_gpt(cfg.replace(vocab_size=cfg.vocab_size or 256), 1)
    return sum(p.numel() for p in m.parameters())


def regime_note(cfg, params: int, coarse: int | None = None) -> str:
    """What the run's regime means for the V-cycle, in a few sentences: level 0's parameters and
    tokens per parameter at ``--steps``, the default recipe that regime gets (when
    ``--fractions`` is not given) and what it measured; below ``COMPUTE_EFFICIENT_TPP`` the
    advice to train the ``coarse``-parameter model instead (a saving against the same-size
    model proves nothing there)."""
    tokens = cfg.steps * cfg.tokens_per_step
    tpp = cfg.tokens_per_param(params)
    line = (f"regime: level 0 has {params:,} parameters; --steps {cfg.steps} is {tokens:,} "
            f"tokens = {tpp:.1f} tokens per parameter")
    shape = ",".join(f"{f:g}" for f in recommended_fractions(cfg.levels, tpp)) if cfg.levels > 1 else ""
    default = (f" The V-cycle's default recipe here is --fractions {shape}" if shape and not cfg.fractions
               else "")
    if tpp >= COMPUTE_EFFICIENT_TPP:
        return (line + "." + (default + " (a short coarse phase early)." if default else "")
                + f" Measured: {MEASURED_ABOVE}. --schedule compare measures both savings on "
                "your model (the envelope: its coarse architecture trained alone too, and "
                "every --alone-sizes size).")
    instead = (f"train the {coarse:,}-parameter model (level 1's architecture) instead"
               if coarse else "train a smaller model instead")
    return (line + f". Below about {COMPUTE_EFFICIENT_TPP:g} tokens per parameter the "
            f"{params:,}-parameter model is likely NOT the compute-efficient size at this budget: "
            f"{instead}, or give it more tokens. A saving against the same-size model is no "
            f"saving here." + (default + " (the most saved against the same-size model)." if default else "")
            + f" Measured: {MEASURED_BELOW}. --schedule compare also trains the coarse "
            "architecture alone and reports the saving against that envelope.")


def size_label(name: str, params: int | None) -> str:
    """``level 1 alone (28,672 params)``, ``the 1 x 32 GPT (2 heads) alone`` (an
    ``--alone-sizes`` size) and the like, for tables and verdicts."""
    if name == "level0":
        what = "the full model"
    elif name.startswith("level"):
        what = f"level {name[len('level'):]} alone"
    else:
        n_layer, n_embd, n_head = name.split("x")
        what = f"the {n_layer} x {n_embd} GPT ({n_head} head{'s' * (n_head != '1')}) alone"
    return what + ("" if params is None else f" ({params:,} params)")

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

COMPUTE_EFFICIENT_TPP = 20.0
MEASURED = ("measured on a 2-core CPU (BENCHMARKS.md, 'Regime map'; 38K-parameter GPT, 25 tokens "
            "per parameter, 3 seeds): against the envelope the default recipe cost 37% more FLOPs "
            "(median) and the best recipe tried, --fractions 0.02,0.08,0.90, saved +4.2% "
            "[-19.2%, +21.2%], within the noise")


def tokens_per_param(tokens: float, params: int) -> float:
    return tokens / max(1, params)


def regime_note(cfg, params: int) -> str:
    """One line: the requested model's parameters and tokens per parameter at ``--steps``, with
    a warning when that is below ``COMPUTE_EFFICIENT_TPP`` (a smaller model is then likely the
    compute-efficient size, and a saving against the same-size model proves nothing)."""
    tokens = cfg.steps * cfg.tokens_per_step
    tpp = tokens_per_param(tokens, params)
    line = (f"regime: level 0 has {params:,} parameters; --steps {cfg.steps} is {tokens:,} "
            f"tokens = {tpp:.1f} tokens per parameter")
    if tpp >= COMPUTE_EFFICIENT_TPP:
        return (line + "; --schedule compare measures whether a smaller size would be "
                f"cheaper (the envelope). So far {MEASURED}.")
    return (line + f". Below about {COMPUTE_EFFICIENT_TPP:g} tokens per parameter the "
            f"{params:,}-parameter model is likely NOT the compute-efficient size at this budget: "
            "a smaller model trained alone usually reaches the same loss for less, so a saving "
            "against the same-size model is no saving. --schedule compare also trains the "
            "coarse architecture alone and reports the saving against that envelope.")


def size_label(name: str, params: int | None) -> str:
    """``level 1 alone (28,672 params)`` and the like, for tables and verdicts."""
    what = "the full model" if name == "level0" else f"level {name[len('level'):]} alone"
    return what + ("" if params is None else f" ({params:,} params)")

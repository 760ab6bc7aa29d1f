"""The named choices of a plan, each written once: the API, the CLI, the training driver's
configuration and the error messages all read them from here."""

from __future__ import annotations

# which width units group together: unit i with i + n/2 (the paper's width default), 2i with
# 2i+1, or the units whose producer weights are most alike
WIDTH_PAIRINGS = ("strided", "adjacent", "similarity")
# growing has no weights to compare yet: only the fixed pairings
GROW_PAIRINGS = ("strided", "adjacent")
# which blocks group together: 2i with 2i+1 (the paper's depth default), or i with i + L/2
DEPTH_PAIRINGS = ("adjacent", "strided")
# how de-coalescing fills new blocks: copies (the paper), or identities (residual writes zeroed)
DEPTH_INITS = ("copy", "identity")

# the two directions of a pass: input is the larger level, or the smaller
COALESCE = "coalesce"
DECOALESCE = "decoalesce"
DIRECTIONS = (COALESCE, DECOALESCE)


def one_of(choices: tuple[str, ...]) -> str:
    """``'a' or 'b'`` / ``'a', 'b' or 'c'``, for messages."""
    quoted = [repr(c) for c in choices]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"

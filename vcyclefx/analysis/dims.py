"""The axis algebra the analysis is built on.

Every tensor axis in a graph gets a :class:`Dim`. Op rules *unify* dims that must always have
the same length and index meaning; a union-find keeps the classes. A dim can be *refined*: a
reshape that splits 768 into (12, 64) refines the dim into a row-major product of two child
dims; a split/slice/cat refines it into a concatenation of segment dims. Refinements live on the
class root and are merged when classes are unified, so the structure found at one node holds
everywhere the axis is used. Leaf dims (never refined) are the atoms spaces are made of.

Sizes are ``int`` or, for symbolic dims (batch, sequence), a sympy expression. Axes of size 1
are inert: they are never unified with anything and never resized.
"""

from __future__ import annotations

from typing import Iterator, Union

import sympy
import torch

Size = Union[int, sympy.Expr]

def sizes_of(node):
    """A node's shape from ``meta["val"]``: a tuple per tensor, a list for tuples of tensors,
    else None."""
    return _shape_tree(node.meta.get("val"))


def _shape_tree(val):
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    if isinstance(val, (list, tuple)):
        return [_shape_tree(v) for v in val]
    return None

PROD = "prod"
CAT = "cat"


def as_size(s) -> Size:
    """An int for static sizes (also a SymInt whose expression is a number), else sympy."""
    if isinstance(s, torch.SymInt):
        expr = s.node.expr
        if getattr(expr, "is_number", False):
            return int(expr)
        return expr
    if isinstance(s, sympy.Expr):
        return int(s) if s.is_number else s
    return int(s)


def is_static(s: Size) -> bool:
    return isinstance(s, int)


def _mul(a: Size, b: Size) -> Size:
    r = a * b
    return as_size(r) if isinstance(r, sympy.Expr) else r


def _div(a: Size, b: Size) -> Size | None:
    """a / b when it is a whole number (or an integer-valued expression), else None."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b if b and a % b == 0 else None
    r = sympy.sympify(a) / sympy.sympify(b)  # monomials cancel automatically
    num, den = sympy.fraction(r)
    if den == 1 and (r.is_integer or num.is_integer):
        return as_size(r)
    return None


def quotient(a: Size, b: Size) -> Size | None:
    """``a / b`` when it is whole (an int, or an integer-valued expression), else None."""
    return _div(a, b)


def _eq(a: Size, b: Size) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if a == b:
        return True
    return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0


class Dim:
    __slots__ = ("id", "size", "parent", "kind", "children", "pins", "flags")

    def __init__(self, id_: int, size: Size):
        self.id = id_
        self.size = size
        self.parent: Dim = self
        self.kind: str | None = None  # PROD | CAT | None (leaf)
        self.children: list[Dim] = []
        self.pins: list[str] = []  # reasons this dim may never be resized
        self.flags: dict[str, str] = {}  # e.g. {"normalized": "<node>"}

    def __repr__(self) -> str:
        return f"Dim#{self.id}({self.size})"


class DimConflict(Exception):
    pass


class DimTable:
    """Union-find over dims with structural refinement.

    ``known_equal(a, b)`` (optional) decides equalities of symbolic sizes that algebra alone
    cannot: the capture's shape environment knows its guards (a sequence padded to a multiple
    of the chunk size and reshaped back is the sequence again)."""

    def __init__(self, known_equal=None) -> None:
        self.dims: list[Dim] = []
        self.known_equal = known_equal

    def _same(self, a: Size, b: Size) -> bool:
        if _eq(a, b):
            return True
        if self.known_equal is None or (isinstance(a, int) and isinstance(b, int)):
            return False
        return bool(self.known_equal(a, b))

    # -- creation / lookup -------------------------------------------------------------------
    def new(self, size) -> Dim:
        d = Dim(len(self.dims), as_size(size))
        self.dims.append(d)
        return d

    def find(self, d: Dim) -> Dim:
        root = d
        while root.parent is not root:
            root = root.parent
        while d.parent is not root:  # path compression
            d.parent, d = root, d.parent
        return root

    def roots(self) -> Iterator[Dim]:
        return (d for d in self.dims if d.parent is d)

    # -- pins and flags ------------------------------------------------------------------------
    def pin(self, d: Dim, reason: str) -> None:
        r = self.find(d)
        if r.size == 1:
            return
        if reason not in r.pins:
            r.pins.append(reason)

    def flag(self, d: Dim, key: str, value: str) -> None:
        self.find(d).flags.setdefault(key, value)

    # -- unification -----------------------------------------------------------------------------
    def unify(self, a: Dim, b: Dim, where: str = "") -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is rb:
            return
        if not self._same(ra.size, rb.size):
            raise DimConflict(f"{where}: cannot unify axes of size {ra.size} and {rb.size}")
        if ra.size == 1:
            return
        if rb.id < ra.id:
            ra, rb = rb, ra
        rb.parent = ra
        for p in rb.pins:
            if p not in ra.pins:
                ra.pins.append(p)
        for k, v in rb.flags.items():
            ra.flags.setdefault(k, v)
        self._merge_structure(ra, rb.kind, rb.children, where)

    def refine(self, d: Dim, kind: str, parts: list[Dim], where: str = "") -> list[Dim] | None:
        """Declare that ``d`` is the ``kind`` (PROD or CAT) of ``parts``; returns ``parts`` (now
        consistent with ``d``'s structure), or None when ``d`` is already structured in an
        incompatible way (its leaves are then pinned with the reason)."""
        r = self.find(d)
        total = _mul_all([p.size for p in parts]) if kind == PROD else _sum_all([p.size for p in parts])
        if not self._same(total, r.size):
            raise DimConflict(f"{where}: {kind} of sizes {[p.size for p in parts]} != {r.size}")
        if len(parts) == 1:
            self.unify(r, parts[0], where)
            return list(parts)
        if not self._merge_structure(r, kind, parts, where):
            return None
        return list(parts)

    def refine_sizes(self, d: Dim, kind: str, sizes: list, where: str = "") -> list[Dim]:
        return self.refine(d, kind, [self.new(s) for s in sizes], where)

    def _merge_structure(self, r: Dim, kind: str | None, parts: list[Dim], where: str) -> bool:
        """Give root ``r`` the structure (kind, parts); False when it conflicts with the one it
        has (its leaves and the parts' are then pinned)."""
        if kind is None:
            return True
        if r.kind is None:
            r.kind, r.children = kind, list(parts)
            return True
        mine = [c.size for c in r.children]
        theirs = [p.size for p in parts]
        if r.kind == kind and len(mine) == len(theirs) and all(map(_eq, mine, theirs)):
            for c, p in zip(r.children, parts):
                self.unify(c, p, where)
            return True
        try:
            self._common_refinement(r, kind, parts, where)
            return True
        except DimConflict:
            reason = f"viewed in incompatible ways ({r.kind}{mine} vs {kind}{theirs}) at {where}"
            for leaf in list(self.leaves(r)) + [x for p in parts for x in self.leaves(p)]:
                self.pin(leaf, reason)
            return False

    def _common_refinement(self, r: Dim, kind: str, parts: list[Dim], where: str) -> None:
        if r.kind == PROD and kind == PROD:
            self.match_products(list(r.children), list(parts), where)
        elif r.kind == CAT and kind == CAT:
            self._match_concats(list(r.children), list(parts), where)
        else:
            segs, prod = (r.children, parts) if r.kind == CAT else (parts, r.children)
            # cat of n equal segments == prod(n, rest): unify each segment with the rest
            if len(prod) >= 2 and prod[0].size == len(segs) and all(_eq(s.size, segs[0].size) for s in segs):
                rest = prod[1] if len(prod) == 2 else self._prod_of(prod[1:], where)
                for s in segs:
                    self.unify(s, rest, where)
                self.pin(prod[0], f"index over {len(segs)} fused segments at {where}")
            else:
                raise DimConflict(where)

    def _prod_of(self, parts: list[Dim], where: str) -> Dim:
        d = self.new(_mul_all([p.size for p in parts]))
        self.refine(d, PROD, parts, where)
        return d

    def match_products(self, a: list[Dim], b: list[Dim], where: str) -> None:
        """Unify two row-major factorisations of the same total (reshape semantics), refining
        factors into common atoms where the boundaries nest. Where they do not, the suffix that
        matched is still unified and DimConflict carries the unmatched prefixes
        (``e.unmatched``)."""
        a = [d for d in a if d.size != 1]
        b = [d for d in b if d.size != 1]
        atoms_a: list[list[Size]] = [[] for _ in a]
        atoms_b: list[list[Size]] = [[] for _ in b]
        links: list[tuple[int, int]] = []  # (factor of a, factor of b) per atom, right to left
        i, j = len(a) - 1, len(b) - 1
        clean = (i, j, 0)  # both sides fully matched to the right of (i, j); links[:n] belong
        ra = a[i].size if i >= 0 else 1
        rb = b[j].size if j >= 0 else 1
        failed = False
        while i >= 0 and j >= 0:
            if _eq(ra, rb):
                atom = ra
            elif _div(ra, rb) is not None:
                atom = rb
            elif _div(rb, ra) is not None:
                atom = ra
            else:
                failed = True
                break
            atoms_a[i].insert(0, atom)
            atoms_b[j].insert(0, atom)
            links.append((i, j))
            ra = _div(ra, atom)
            rb = _div(rb, atom)
            if ra == 1:
                i -= 1
                ra = a[i].size if i >= 0 else 1
            if rb == 1:
                j -= 1
                rb = b[j].size if j >= 0 else 1
            if ra == (a[i].size if i >= 0 else 1) and rb == (b[j].size if j >= 0 else 1):
                clean = (i, j, len(links))
        if failed or i >= 0 or j >= 0:
            ci, cj, n = clean
            self._materialise(a, b, atoms_a, atoms_b, links[:n], ci + 1, cj + 1, where)
            err = DimConflict(f"{where}: cannot match sizes {[d.size for d in a]} with {[d.size for d in b]}")
            err.unmatched = (a[: ci + 1], b[: cj + 1])
            raise err
        self._materialise(a, b, atoms_a, atoms_b, links, 0, 0, where)

    def _materialise(self, a, b, atoms_a, atoms_b, links, start_a, start_b, where) -> None:
        """Refine factors a[start_a:], b[start_b:] into their atoms and unify the atoms."""
        kids_a = {k: self._atomise(a[k], atoms_a[k], where) for k in range(start_a, len(a))}
        kids_b = {k: self._atomise(b[k], atoms_b[k], where) for k in range(start_b, len(b))}
        pos_a = {k: len(v) for k, v in kids_a.items()}
        pos_b = {k: len(v) for k, v in kids_b.items()}
        for ia, ib in links:  # atoms were found right to left
            pos_a[ia] -= 1
            pos_b[ib] -= 1
            self.unify(kids_a[ia][pos_a[ia]], kids_b[ib][pos_b[ib]], where)

    def _atomise(self, d: Dim, atoms: list[Size], where: str) -> list[Dim]:
        if len(atoms) == 1:
            return [d]
        kids = self.refine_sizes(d, PROD, atoms, where)
        if kids is None:
            raise DimConflict(f"{where}: axis of size {d.size} cannot be split as {atoms}")
        return kids

    def _match_concats(self, a: list[Dim], b: list[Dim], where: str) -> None:
        sizes_a = [d.size for d in a]
        sizes_b = [d.size for d in b]
        if not all(isinstance(s, int) for s in sizes_a + sizes_b):
            raise DimConflict(where)
        cuts = sorted(set(_cumsum(sizes_a)) | set(_cumsum(sizes_b)))
        pieces_a = [self._split_segment(d, off, cuts, where) for d, off in zip(a, _offsets(sizes_a))]
        pieces_b = [self._split_segment(d, off, cuts, where) for d, off in zip(b, _offsets(sizes_b))]
        flat_a = [p for ps in pieces_a for p in ps]
        flat_b = [p for ps in pieces_b for p in ps]
        for x, y in zip(flat_a, flat_b):
            self.unify(x, y, where)

    def _split_segment(self, d: Dim, offset: int, cuts: list[int], where: str) -> list[Dim]:
        inner = [c - offset for c in cuts if offset < c < offset + d.size]
        if not inner:
            return [d]
        sizes = [b - a for a, b in zip([0] + inner, inner + [d.size])]
        kids = self.refine_sizes(d, CAT, sizes, where)
        if kids is None:
            raise DimConflict(f"{where}: axis of size {d.size} cannot be cut at {inner}")
        return kids

    # -- structure queries -----------------------------------------------------------------
    def leaves(self, d: Dim) -> Iterator[Dim]:
        r = self.find(d)
        if r.kind is None:
            yield r
            return
        for c in r.children:
            yield from self.leaves(c)

    def layout(self, d: Dim):
        """The axis' structure as nested tuples: a leaf root ``Dim`` | (PROD|CAT, [layouts])."""
        r = self.find(d)
        if r.kind is None:
            return r
        return (r.kind, [self.layout(c) for c in r.children])


def _mul_all(sizes) -> Size:
    out: Size = 1
    for s in sizes:
        out = _mul(out, s)
    return out


def _sum_all(sizes) -> Size:
    out = 0
    for s in sizes:
        out = out + s
    return as_size(out) if isinstance(out, sympy.Expr) else out


def _cumsum(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        acc += s
        out.append(acc)
    return out[:-1]


def _offsets(sizes: list[int]) -> list[int]:
    return [0] + _cumsum(sizes)


def new_size(table: DimTable, d: Dim, leaf_sizes: dict[int, int]) -> Size:
    """The size of ``d`` once leaves are resized (``leaf_sizes``: root id -> new size)."""
    r = table.find(d)
    if r.kind is None:
        return leaf_sizes.get(r.id, r.size)
    sizes = [new_size(table, c, leaf_sizes) for c in r.children]
    return _mul_all(sizes) if r.kind == PROD else _sum_all(sizes)


def layout_size(layout) -> int:
    """Static size of a layout from :meth:`DimTable.layout`."""
    if isinstance(layout, Dim):
        return int(layout.size)
    kind, kids = layout
    sizes = [layout_size(k) for k in kids]
    out = 1
    if kind == PROD:
        for s in sizes:
            out *= s
        return out
    return sum(sizes)

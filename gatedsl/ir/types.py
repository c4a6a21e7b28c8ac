"""Static tensor types: shapes of concrete and symbolic dimensions, dtypes, broadcasting, and FLOP polynomials."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Sym:
    """A symbolic dimension: an integer coefficient times a product of named sizes (B, T, B*T, 2*T)."""

    factors: tuple[str, ...]  # sorted, with repeats
    coeff: int = 1

    @staticmethod
    def named(name: str) -> "Sym":
        return Sym((name,))

    def __str__(self) -> str:
        body = "*".join(self.factors)
        return body if self.coeff == 1 else f"{self.coeff}*{body}"

    __repr__ = __str__


Dim = int | Sym


def dim_mul(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    if isinstance(a, int):
        a, b = b, a
    if isinstance(b, int):
        return 0 if b == 0 else Sym(a.factors, a.coeff * b)
    return Sym(tuple(sorted(a.factors + b.factors)), a.coeff * b.coeff)


def dim_div(a: Dim, b: Dim) -> Dim | None:
    """Exact division of dims, or None where it is not exact or not expressible."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b if b and a % b == 0 else None
    if isinstance(a, Sym) and isinstance(b, int):
        return Sym(a.factors, a.coeff // b) if b and a.coeff % b == 0 else None
    if isinstance(a, Sym) and isinstance(b, Sym):
        rest = Counter(a.factors)
        rest.subtract(b.factors)
        if any(v < 0 for v in rest.values()) or a.coeff % b.coeff:
            return None
        factors = tuple(sorted(rest.elements()))
        coeff = a.coeff // b.coeff
        return Sym(factors, coeff) if factors else coeff
    return None


def show_dim(d: Dim) -> str:
    return str(d)


Shape = tuple[Dim, ...]


def show_shape(shape: Shape) -> str:
    return "[" + ", ".join(show_dim(d) for d in shape) + "]"


def numel(shape: Shape) -> Dim:
    out: Dim = 1
    for d in shape:
        out = dim_mul(out, d)
    return out


DTYPES = ("bool", "int", "float")  # ordered: arithmetic promotes to the later one


@dataclass(frozen=True, init=False)
class TensorType:
    shape: Shape
    dtype: str = "float"

    def __init__(self, shape: Shape, dtype: str = "float"):
        # Fields written straight to __dict__: a frozen dataclass's own __init__ (object.__setattr__ per field)
        # takes twice as long, and every op's shape rule builds its output types.
        self.__dict__.update(shape=shape, dtype=dtype)

    def __str__(self) -> str:
        prefix = "" if self.dtype == "float" else self.dtype
        return prefix + show_shape(self.shape)

    @property
    def rank(self) -> int:
        return len(self.shape)


def promote(a: str, b: str) -> str:
    return a if a == b or DTYPES.index(a) >= DTYPES.index(b) else b


def broadcast(a: Shape, b: Shape) -> Shape | None:
    """NumPy broadcasting over static dims; None where the shapes cannot broadcast."""
    if a == b:  # most element-wise ops
        return a
    out: list[Dim] = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            return None
    return tuple(reversed(out))


def normalize_axis(axis: int, rank: int) -> int | None:
    if -rank <= axis < rank:
        return axis % rank
    return None


class Poly:
    """A polynomial in the symbolic dims with integer coefficients, used to count FLOPs."""

    __slots__ = ("terms",)

    def __init__(self, terms: dict[tuple[str, ...], int] | None = None):
        self.terms = {k: v for k, v in (terms or {}).items() if v}

    @staticmethod
    def _nonzero(terms: dict[tuple[str, ...], int]) -> "Poly":
        """A Poly of terms known to have no zero coefficient (FLOP counting builds one per op: no filtering)."""
        poly = Poly.__new__(Poly)
        poly.terms = terms
        return poly

    @staticmethod
    def of(d: Dim) -> "Poly":
        if isinstance(d, int):
            return Poly({(): d})
        return Poly({d.factors: d.coeff})

    @staticmethod
    def numel(shape: Shape) -> "Poly":
        # Poly.of(numel(shape)), without a Sym per factor: every op's FLOP count starts here.
        coeff, factors = 1, ()
        for d in shape:
            if type(d) is int:
                coeff *= d
            else:
                coeff *= d.coeff
                factors += d.factors
        return Poly._nonzero({tuple(sorted(factors)): coeff} if coeff else {})

    def __add__(self, other: "Poly") -> "Poly":
        terms = dict(self.terms)
        for k, v in other.terms.items():
            terms[k] = terms.get(k, 0) + v
        return Poly(terms)

    def __mul__(self, other: "Poly | int") -> "Poly":
        if isinstance(other, int):
            return Poly._nonzero({k: v * other for k, v in self.terms.items()}) if other else Poly()
        terms: dict[tuple[str, ...], int] = {}
        for k1, v1 in self.terms.items():
            for k2, v2 in other.terms.items():
                k = tuple(sorted(k1 + k2))
                terms[k] = terms.get(k, 0) + v1 * v2
        return Poly(terms)

    __rmul__ = __mul__

    def evaluate(self, sizes: dict[str, int] | None = None) -> int:
        """The value with each symbol set to its size (1 where none is given)."""
        sizes = sizes or {}
        total = 0
        for factors, coeff in self.terms.items():
            value = coeff
            for f in factors:
                value *= sizes.get(f, 1)
            total += value
        return total

    def __str__(self) -> str:
        if not self.terms:
            return "0"
        parts = []
        for factors, coeff in sorted(self.terms.items(), key=lambda kv: (-len(kv[0]), kv[0])):
            # Exact, in thousands: a unit letter (T for tera, G, M, k) would read as one more symbolic size.
            c = f"{coeff:,}"
            parts.append(c if not factors else ("" if coeff == 1 else c + "·") + "·".join(factors))
        return " + ".join(parts)

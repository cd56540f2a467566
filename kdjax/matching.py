"""Layer matching: which student layer learns from which teacher layer.

Two index spaces exist. *Hidden* indices run over the L+1 hidden states (0 = embeddings, i = output of
layer i, HF convention); *attention* indices run over the L layers (0-based). A strategy turns the
two depths into `(student_index, teacher_index)` pairs in one of the spaces:

- `uniform` (TinyBERT): k = N/M; hidden: m <- m·k for m = 0..M (embeddings included);
    attention: m <- m·k + k - 1.
- `last`: the top M teacher layers: hidden m <- N - M + m (m = 1..M); attention m <- N - M + m.
- `skip` (PKD-skip): hidden m <- m·k for m = 1..M-1 (embeddings and the last layer excluded).
- `pkd_last` (PKD-last): hidden m <- N - M + m for m = 1..M-1 (6 of 12: teacher layers 7..11).
- `first`: m <- m (hidden m = 1..M, attention m = 0..M-1).
- `final`: the last layers only: hidden (M, N), attention (M-1, N-1).
- `embeddings`: hidden (0, 0).
- an explicit sequence of pairs.
"""

from __future__ import annotations

from typing import Sequence, Union

STRATEGIES = ("uniform", "last", "skip", "pkd_last", "first", "final", "embeddings")


class MatchingError(ValueError):
    """A layer map that does not fit the student and teacher depths."""


Pairs = tuple[tuple[int, int], ...]


def layer_pairs(strategy: Union[str, Sequence[Sequence[int]]], student_layers: int, teacher_layers: int,
                                space: str = "hidden") -> Pairs:
    """`(student, teacher)` index pairs for `strategy` in `space` ("hidden" or "attention")."""
    if space not in ("hidden", "attention"):
        raise MatchingError(f"unknown index space {space!r}; use 'hidden' or 'attention'")
    m_, n_ = int(student_layers), int(teacher_layers)
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise MatchingError(f"unknown layer matching {strategy!r}; known: {', '.join(STRATEGIES)} or explicit pairs")
        if strategy in ("uniform", "skip", "pkd_last", "last", "first") and m_ > n_:
            raise MatchingError(f"matching {strategy!r} needs a student no deeper than the teacher "
                                                    f"({m_} > {n_} layers); give explicit pairs")
        if strategy in ("uniform", "skip") and n_ % m_:
            raise MatchingError(f"uniform matching needs teacher layers ({n_}) divisible by student layers ({m_}); "
                                                    "use 'last', 'first' or explicit pairs")
        k = n_ // m_ if m_ else 0
        hidden = space == "hidden"
        if strategy == "uniform":
            pairs = [(m, m * k) for m in range(m_ + 1)] if hidden else [(m, m * k + k - 1) for m in range(m_)]
        elif strategy == "last":
            pairs = [(m, n_ - m_ + m) for m in range(1, m_ + 1)] if hidden else [(m, n_ - m_ + m) for m in range(m_)]
        elif strategy == "skip":
            pairs = [(m, m * k) for m in range(1, m_)] if hidden else [(m - 1, m * k - 1) for m in range(1, m_)]
        elif strategy == "pkd_last":
            pairs = ([(m, n_ - m_ + m) for m in range(1, m_)] if hidden
                              else [(m - 1, n_ - m_ + m - 1) for m in range(1, m_)])
        elif strategy == "first":
            pairs = [(m, m) for m in range(1, m_ + 1)] if hidden else [(m, m) for m in range(m_)]
        elif strategy == "final":
            pairs = [(m_, n_)] if hidden else [(m_ - 1, n_ - 1)]
        else:  # embeddings
            if not hidden:
                raise MatchingError("matching 'embeddings' only exists for hidden-state terms")
            pairs = [(0, 0)]
    else:
        pairs = [tuple(int(x) for x in p) for p in strategy]
        if any(len(p) != 2 for p in pairs):
            raise MatchingError(f"explicit layer pairs must be (student, teacher) tuples, got {list(strategy)}")
    _check(pairs, m_, n_, space)
    return tuple(pairs)


def _check(pairs, m_, n_, space):
    top_s = m_ if space == "hidden" else m_ - 1
    top_t = n_ if space == "hidden" else n_ - 1
    for s, t in pairs:
        if not (0 <= s <= top_s and 0 <= t <= top_t):
            raise MatchingError(
                    f"layer map out of range: pair (student {s}, teacher {t}) but {space} indices are "
                    f"0..{top_s} for the {m_}-layer student and 0..{top_t} for the {n_}-layer teacher")

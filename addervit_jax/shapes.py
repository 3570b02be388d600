"""The ``LxD_INxD_OUT`` spelling of a similarity op's shape, as ``addervit check-kernels --shapes``
and the benchmarks of ``experiments/`` take it: ``4096x384x1536`` is ``x`` ``(4096, 384)`` times
``w`` ``(384, 1536)``, L tokens from D_in to D_out features."""

from __future__ import annotations

__all__ = ["parse_shape"]


def parse_shape(spec: str) -> tuple[int, int, int]:
    """``"LxD_INxD_OUT"`` -> ``(L, D_in, D_out)``; ``X`` works as well as ``x``.

    Raises ``ValueError`` naming ``spec`` unless it is three positive integers joined by ``x``.
    """
    parts = spec.strip().lower().split("x")
    if len(parts) == 3 and all(p.isascii() and p.isdigit() for p in parts):
        shape = tuple(int(p) for p in parts)
        if min(shape) > 0:
            return shape
    raise ValueError(
        f"shape {spec!r}: expected LxD_INxD_OUT, three positive integers joined by 'x' "
        "(e.g. 4096x384x1536)"
    )

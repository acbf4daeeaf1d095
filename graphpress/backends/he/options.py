"""Options of the ``he`` backend (needs neither torch nor tenseal: validated before any work)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HEOptions:
    """``get_backend("he", **options)`` / ``--backend-option key=value``.

    Attributes
    ----------
    version : int
        Options format version (1).
    encoding : str
        ``"coeff-circulant"`` (compact block-circulant layers, dense ones coefficient encoded),
        ``"coeff-dense"`` or ``"slot-dense"`` (``--he-encoding``).
    protocol : str
        ``"secure"`` (default: two parties, HE on secret shares + SPU 2PC; the client learns only
        the output), ``"interactive"`` (debugging: the client sees every activation) or
        ``"polynomial"`` (CKKS, fully encrypted) (``--he-protocol``).
    act_bits, weight_bits : int
        Fixed-point bits of the encrypted activations and of the weights (interactive;
        ``--he-act-bits``, ``--he-weight-bits``).
    percentile : float, optional
        Activation range from this percentile of ``|x|`` instead of the maximum.
    poly_degree : int, optional
        Force the ring degree ``N`` (default: the smallest that fits each layer at 128-bit
        security).
    check_seeds : tuple of int
        Seeded random input sets encrypted by the check besides the example inputs.
    stat_bits : int
        Statistical security of the noise flooding of the ``secure`` protocol (at least 40).
    measure_costs : bool
        Measure the per-op costs the program's parameters need when the cache lacks them, so
        that ``he_cost.json`` has predictions.
    """

    version: int = 1
    encoding: str = "coeff-circulant"
    protocol: str = "secure"
    stat_bits: int = 40
    act_bits: int = 8
    weight_bits: int = 8
    percentile: float | None = None
    poly_degree: int | None = None
    check_seeds: tuple[int, ...] = (0,)
    measure_costs: bool = True


__all__ = ["HEOptions"]

"""BFV parameters of the secure protocol: room for one product *and* for noise flooding.

A layer's result must decrypt exactly after the server adds flooding noise of ``2^f`` with
``f = noise_bits + stat_bits`` (``noise_bits`` bounds the weight-dependent noise,
:func:`graphpress.backends.he.secure.hestep.noise_bound_bits`; ``stat_bits``, 40 by default, is
the statistical security of the flooding), and again after the switch down to the last prime:

    log2(q_data) >= log2(t) + f + 3          every data prime >= log2(t) + 16

(the ``+3``: the message plus the offset, the flooding and the product noise; after the switch
the rounding noise, about ``sqrt(N)``, must stay far below ``q_last / 2t``). ``t`` is a prime
``= 1 (mod 2N)`` above ``2^plain_bits`` (block-circulant layers twist with a ``2b``-th root of
unity mod ``t``). No key switching is ever needed, so the special prime is small. The smallest
``N`` of the 128-bit table that fits is used; nothing fits: a one-line error naming the layer.
"""

from __future__ import annotations

import math
from typing import Callable

from graphpress.backends.he.bfv import MAX_COEFF_BITS, MAX_PRIME_BITS, BFVParams, _avoid_plain_modulus, _import_seal, _special_bits, find_plain_modulus
from graphpress.errors import BackendError

#: Default statistical security of the noise flooding (bits).
STAT_BITS = 40


def secure_params(
    plain_bits: int,
    noise_bits: Callable[[int, int], int],
    *,
    stat_bits: int = STAT_BITS,
    poly_degree: int | None = None,
    what: str = "",
) -> tuple[BFVParams, int]:
    """``(params, flood_bits)`` for a layer whose results need ``t > 2^plain_bits``.

    ``noise_bits(t, n)`` is the layer's weight-dependent noise bound for a candidate ``t`` and
    ``N = n`` (the tiling, hence which weights share a response, depends on ``N``).
    """
    seal = _import_seal()
    if not 1 <= plain_bits < MAX_PRIME_BITS:
        raise BackendError(f"he secure: layer {what!r}: plain modulus of {plain_bits} bits is outside 1..{MAX_PRIME_BITS - 1}; lower the fixed-point bits")
    degrees = [poly_degree] if poly_degree else sorted(MAX_COEFF_BITS)
    need, unfit = 0, None
    for n in degrees:
        if n not in MAX_COEFF_BITS:
            raise BackendError(f"he secure: poly_degree {n} is not one of {sorted(MAX_COEFF_BITS)}")
        t = find_plain_modulus(plain_bits, n)
        tb = t.bit_length()
        try:
            flood = noise_bits(t, n) + stat_bits
        except BackendError as err:  # the layer does not tile at this N (a row block exceeds N/b)
            unfit = err
            continue
        need = tb + flood + 3
        special = _special_bits(n)
        budget = MAX_COEFF_BITS[n] - special
        n_data = max(2, math.ceil(need / (MAX_PRIME_BITS - 2)))
        size = max(math.ceil(need / n_data), tb + 16)
        if size > MAX_PRIME_BITS or size * n_data > budget:
            continue
        bits = _avoid_plain_modulus(seal, n, tuple([size] * n_data + [special]), t)
        params = BFVParams(n, bits, t)
        params.check(what)
        return params, flood
    if unfit is not None and need == 0:
        raise unfit
    raise BackendError(
        f"he secure: layer {what!r}: no 128-bit BFV parameters hold a {plain_bits}-bit result with {stat_bits}-bit noise flooding "
        f"(~{need} data bits at N={degrees[-1]}); lower the fixed-point bits or stat_bits"
    )


__all__ = ["STAT_BITS", "secure_params"]

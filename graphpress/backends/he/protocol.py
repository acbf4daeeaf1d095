"""Protocol modes of the HE backend: who computes what, and what each party learns.

Two parties: the *client* owns the input and the secret key; the *server* owns the weights.
Both modes assume semi-honest (honest-but-curious) parties and 128-bit RLWE security of the
parameters (:mod:`graphpress.backends.he.bfv` picks them from the HE standard's table).

``secure`` (BFV + SPU, this backend's default)
    The two-party protocol of :mod:`graphpress.backends.he.secure`: the linear layers run under
    BFV on additive secret shares, the server masks every result with fresh uniform values,
    re-randomizes it with an encryption of zero under the client's public key and floods its
    noise (40-bit statistical distance), and sends only the coefficients the client reads; the
    nonlinearities run on the shares in SPU's Cheetah protocol. *Protected*: the client's input,
    every activation and the output against the server; the weights, biases and scales and every
    intermediate value against the client, which learns only the output. *Not protected*: the
    architecture and shapes, the output itself (extraction by many queries), malicious behaviour.

``interactive`` (BFV; a debugging mode: the client sees every activation)
    Per encrypted layer: the client quantizes its activation, encrypts it and sends it; the
    server multiplies by its plaintext integer weights (coefficient or slot encoding) and sends
    the ciphertext back; the client decrypts ``y_int = W_int x_int``, dequantizes, adds the bias,
    and runs everything up to the next linear/conv layer (ReLU, pooling, flatten, add, ...) in
    plaintext, then quantizes and encrypts again.

    *Protected*: the client's input and every intermediate activation against the server (it
    only ever sees fresh BFV ciphertexts; it learns the shapes, the number of layers and the
    timing).

    *Not protected*: the model against the client. The client decrypts every linear layer's
    pre-activation output ``W_int x_int`` exactly, and it chooses every layer's input itself
    (it re-encrypts between layers), so ``n`` one-hot queries to a layer reveal that layer's
    ``W_int`` column by column: the weights are extractable. The client also holds the per-layer
    scales and the biases (it dequantizes and adds them). The returned ciphertexts are not
    re-randomized (no noise flooding), so their noise depends on the weights, and with
    coefficient encoding the product polynomial's unused coefficients carry further linear
    combinations of weights and inputs that the client decrypts too.

    What real protocols add (GAZELLE, USENIX Security 2018; Cheetah, USENIX Security 2022):
    before returning ``Enc(W x)`` the server adds a uniformly random mask ``r`` (and flooding
    noise), so the client decrypts ``W x + r`` -- uniformly random to it -- while the server keeps
    ``-r``: the pre-activation is *additively secret-shared*. The nonlinearity, the truncation
    (re-quantization) and the pooling then run as two-party computation on the shares
    (garbled circuits in GAZELLE; silent-OT-based protocols in Cheetah), and the next layer's
    input is again a pair of shares. Neither party sees an intermediate value and the client
    learns only the final output. This backend runs the same server-side HE work per layer
    (the part whose cost the encodings and the block-circulant weights reduce) but replaces the
    masking and the 2PC nonlinearities by plaintext evaluation on the client: it measures the
    HE cost faithfully and protects the client's data, not the server's model.

``polynomial`` (CKKS, for small models)
    The whole network runs encrypted on the server; the nonlinearities are replaced by
    low-degree polynomials (pass ``polynomial-activations``) so that the server evaluates them
    homomorphically. The client encrypts the input once and decrypts the output once.
    *Protected*: the input and every intermediate value against the server, and the
    intermediate values against the client (it sees only the output). *Not protected*: the
    output itself (model extraction from many output queries remains possible, as for any
    prediction API), the architecture and the layer shapes; the polynomial activations change
    the model's function (accuracy is reported separately). Multiplicative depth grows with
    every layer and activation, which is why it suits small models only. Implemented in
    :mod:`graphpress.backends.he.polynomial`.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass

from graphpress.errors import BackendError


@dataclass(frozen=True)
class Protocol:
    """A protocol mode and its threat-model summary (stored in the program and the report)."""

    name: str
    scheme: str
    summary: str
    server_learns: str
    client_learns: str
    not_protected: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


PROTOCOLS: dict[str, Protocol] = {
    "secure": Protocol(
        name="secure",
        scheme="BFV + SPU (Cheetah 2PC)",
        summary=(
            "two processes: linear/conv layers run under BFV on additive secret shares (server masks, re-randomizes and "
            "floods every result), ReLU / pooling / requantization run as two-party computation in SPU's Cheetah protocol; "
            "the client learns only the output"
        ),
        server_learns="nothing about the input, the activations or the output beyond shapes, layer count and timing",
        client_learns=(
            "the output, and the public program: layer shapes, BFV parameters, the input quantizer; never an intermediate "
            "value, a weight, a bias or a scale (uniformly masked shares, noise flooded to 40 bits of statistical distance)"
        ),
        not_protected=(
            "the architecture and the layer shapes; the output itself (model extraction by many queries, as for any "
            "prediction API); security holds against semi-honest parties only"
        ),
    ),
    "interactive": Protocol(
        name="interactive",
        scheme="BFV",
        summary=(
            "DEBUGGING MODE, client sees activations: linear/conv layers run on encrypted inputs on the server; the client "
            "decrypts each layer's output, applies the nonlinearities in plaintext, re-quantizes and re-encrypts"
        ),
        server_learns="nothing about the input or the activations beyond shapes, layer count and timing (fresh BFV ciphertexts only)",
        client_learns=(
            "every linear/conv layer's pre-activation output W_int x_int (exactly), the per-layer scales and the biases; "
            "no masking: real protocols (GAZELLE, Cheetah) secret-share these outputs with a server mask and run the "
            "nonlinearities in two-party computation"
        ),
        not_protected=(
            "the model against the client: it chooses every layer's input and sees its output, so the weights are "
            "extractable with one-hot queries; returned ciphertexts are not re-randomized (no circuit privacy)"
        ),
    ),
    "polynomial": Protocol(
        name="polynomial",
        scheme="CKKS",
        summary="the whole network runs encrypted on the server, with polynomial activations; one round trip",
        server_learns="nothing about the input, the activations or the output beyond shapes and timing",
        client_learns="only the final output (approximate, CKKS)",
        not_protected="the output (model extraction by many queries, as for any prediction API), the architecture",
    ),
}


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; unknown names are a one-line :class:`BackendError`."""
    if name not in PROTOCOLS:
        close = difflib.get_close_matches(str(name), PROTOCOLS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise BackendError(f"he: option 'protocol': unknown protocol {name!r}; {hint}known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


__all__ = ["PROTOCOLS", "Protocol", "get_protocol"]

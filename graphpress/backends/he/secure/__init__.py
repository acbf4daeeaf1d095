"""The secure two-party protocol: HE linear layers on additive secret shares, SPU nonlinearities.

Threat model (semi-honest parties, 128-bit RLWE, 40-bit statistical flooding): the client
learns the network's output and the public program (layer shapes, BFV parameters, the input
quantizer); the server learns nothing about the input, the activations or the output. Pieces:
:mod:`.compile` (graph -> integer program, needs torch), :mod:`.program` (the program and its
numpy fixed-point reference), :mod:`.hestep` (one masked, flooded HE layer), :mod:`.nonlinear`
(SPU segments), :mod:`.wire` (the counted channel), :mod:`.party` (the two processes),
:mod:`.launch` (start them, count SPU's bytes). See ``docs/backends/he-secure.md``.
"""

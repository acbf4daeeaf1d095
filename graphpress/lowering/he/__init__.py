"""HE cost arithmetic: the BFV kernels' plans and exact operation counts, and the measured
per-operation seconds that price them. Pure Python (``math``, ``json``): no HE library, no torch.

* :mod:`graphpress.lowering.he.counts` -- layouts and operation counts of each encoding
  (the HE kernels execute these plans; their tests compare the kernels' counters with them);
* :mod:`graphpress.lowering.he.op_costs` -- the per-machine cache of measured operation times
  and the prediction ``counts x seconds``.

Two layers use it: the HE backend (:mod:`graphpress.backends.he`), which executes the plans and
measures the costs, and the ``circulant-search`` pass, whose ``he-analytic`` / ``he-measured``
cost models price a layer at every block size without running HE. That makes this package the
one part of :mod:`graphpress.lowering` a pass may import: the ``passes-only-ir`` contract in
``pyproject.toml`` forbids every other lowering subpackage to passes, and its indirect-import
check keeps this package from importing one (``tests/test_layering.py``).
"""

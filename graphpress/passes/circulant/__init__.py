"""Block-circulant weights (PrivCirNet): projection, layer-wise block-size search.

Importing this package registers its passes.
"""

from graphpress.passes.circulant import projection, search  # noqa: F401

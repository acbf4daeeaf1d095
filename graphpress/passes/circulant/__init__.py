"""Block-circulant weights (PrivCirNet): projection, layer-wise block-size search.

Importing this package registers its passes.
"""

"""Apache TVM Relax backend (``pip install -e ".[tvm]"``): graph -> Relax -> compiled library + Relax VM."""

"""Reference implementations that parity tests and benchmarks compare our towers with.

Plain readings of the Puffin reference (docs/puffin.md §1-§2) assembled from ``transformers``, ``diffusers`` and plain
PyTorch modules. Training code never imports this package.
"""

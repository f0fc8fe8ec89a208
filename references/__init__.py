"""Plain restatements of the third-party code that jretrieval replaces, for tests and benchmarks.

Each module restates one reference (torchvision's ResNet, AMDIM's encoder, cirtorch, revisitop,
the diffusion authors' code, ...) in PyTorch, NumPy or SciPy, written from the facts of the
original and kept obviously correct rather than fast. `tests/` and `bench/` both import from
here; nothing here imports `tests/` or `bench/`, and the library never imports this package.
"""

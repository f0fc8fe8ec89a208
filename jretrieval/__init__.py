"""jretrieval: instance-level image retrieval with frozen pretrained encoders in JAX/Flax.

Conventions used across the package: images and feature maps are NHWC, descriptor sets are
row-major ``[N, D]``, similarities are ``queries @ database.T`` of shape ``[Q, N]``.
"""

__version__ = "0.1.0"

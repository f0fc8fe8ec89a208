"""Search new images: build an index of a folder once, then query it from Python or the shell.

``Index.build(out, images=DIR, model=NAME)`` (or ``python -m jretrieval.index build``) runs the
experiment's pipeline over a folder of images (BN recalibration, resumable extraction, single-
or multi-scale, PCA-whitening, DBA, offline diffusion) and writes one index directory;
``Index.load(path).query(images=[...], bbx=[...], k=10)`` (or ``python -m jretrieval.index
query``) answers with the top-k images, scores and paths. Modules: ``api`` (the ``Index``
class), ``build``, ``files`` (the on-disk format), ``export`` (table, JSON, npy, faiss),
``picture``, ``wiring`` (the only caller of the rest of jretrieval), ``__main__`` (the CLI).
"""

from jretrieval.index.api import Index, QueryError, Results
from jretrieval.index.files import FORMAT, IndexFileError

__all__ = ["FORMAT", "Index", "IndexFileError", "QueryError", "Results"]

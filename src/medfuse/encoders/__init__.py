"""2D foundation encoders behind :class:`~medfuse.encoders.base.SliceEncoder`; safe weight loading.

Importing this package registers the built-in encoders in :data:`medfuse.registry.ENCODERS`.
"""

from medfuse.encoders import dinov3, medsam2, sam_vitb, tiny  # noqa: F401  (registration)

"""mcf: Mask Contrastive Face pre-training, from raw faces to downstream metrics."""

__version__ = "0.1.0"

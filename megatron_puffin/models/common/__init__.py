"""Building blocks every tower shares: the ``TransformerConfig`` arguments, the local SDPA core attention, the
bidirectional encoder layer spec (ViT and connectors), reference initialisations at any tensor-parallel size, and
what the tower builders share."""

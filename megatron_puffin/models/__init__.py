"""Model towers: LLM, vision, DiT, connectors, VAE, and their composition."""

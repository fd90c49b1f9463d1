"""minisora: two-stage latent-caching video Diffusion Transformers (encode once, train on latents)."""

__version__ = "0.1.0"

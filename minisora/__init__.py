"""minisora: two-stage latent-caching video Diffusion Transformers (encode once, train on latents)."""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported through diffusers -> peft) warns at import time that an optional CPU
# kernel package is missing; minisora never uses 4-bit kernels, so keep the CLI output clean.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

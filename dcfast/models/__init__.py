"""Models: reading a local diffusers directory or a Hub id from the local cache (`loading`, `hub`), and
the tiny Stable-Diffusion-layout models built in code for tests, benchmarks and pretraining (`tiny`).

May import: `dcfast.engine` (for the supported prediction types), diffusers, transformers. Nothing above.
"""

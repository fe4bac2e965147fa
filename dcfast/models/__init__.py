"""Models: reading a local diffusers directory or a Hub id from the local cache (`loading`, `hub`),
the tiny Stable-Diffusion-layout models built in code for tests, benchmarks and pretraining (`tiny`), and real
architectures (SD 1.5) built in code from their published configs with random weights (`architectures`).

May import: `dcfast.engine` (for the supported prediction types), diffusers, transformers. Nothing above.
"""

"""The DC engine: multi-concept diffusion-classifier errors in one batched U-Net pass (`scores`), the chunk
planner and CPU autotuner behind it (`chunks`), the diffusion targets (`targets`), the shared-work U-Net
pass (`unet_pass`), the in-place per-sample Fisher accumulator (`fisher`), and the naive loops every one
of them is tested against (`reference`).

May import: `dcfast.ops` (and through it the kernels), torch. Nothing that trains, evaluates or reads files.
"""

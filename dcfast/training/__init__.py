"""Training (`dcfast.train(config)` is its entry point; the folder is `training` so that the public
function keeps its name): the run config and its shared fields (`config`), every check made before a model loads
(`preflight`), the trainer loop (`trainer`), the methods, each owning its settings (`methods/`), their
losses (`objectives`), modifier tokens (`tokens`), the LoRA adapter (`adapters`), mid-task checkpoints
(`checkpoint`) and loss curves and validation samples (`monitor`).

May import: `dcfast.engine`, `dcfast.models`, `dcfast.io`, `dcfast.eval` (validation samples and
evaluation after each task).
"""

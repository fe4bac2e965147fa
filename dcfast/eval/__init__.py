"""Evaluation of a run's task states: DC classification (`classify`), sampling (`sampling`), image
features (`features`), accuracy / MMD / fidelity matrices and their summaries (`metrics`,
`evaluation`), and the report with its plots (`report`).

May import: `dcfast.engine`, `dcfast.models`, `dcfast.io` (runs are read through `dcfast.io.runs.Run`),
`dcfast.world` (fidelity of world concepts through the oracle). Never `dcfast.training`.
"""

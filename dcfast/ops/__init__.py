"""Python faces of dcfast's kernels: one module per op (schema in csrc/ops.cpp), with its fake and autograd
registrations and its plain-torch reference.

May import: `dcfast._backend`, `dcfast.kernels`, torch. It is the bottom layer with them.
"""
from dcfast.ops.dc_error import dc_error, dc_error_reference
from dcfast.ops.fisher import fisher_accumulate_, fisher_accumulate_reference

__all__ = ["dc_error", "dc_error_reference", "fisher_accumulate_", "fisher_accumulate_reference"]

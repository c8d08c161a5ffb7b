"""ORPO and CPO (SimPO, AlphaPO): the shared-prefix `concatenated_forward` of `trl.experimental`'s paired trainers.

Not imported by the package root: `trl.experimental` warns on import, so `trl_prefix_share` loads these lazily.
"""

"""Token mixers that carry a state along the sequence (short convolutions, Mamba2 SSMs, gated delta rules) in packed
rows: every document starts from a zero state and every branch continues from the state at the end of its shared
prefix, with gradients through that state into all branches.

`kinds` reads what a mixer is from its code (the structural check), `segments` cuts a packed layout into the runs a
mixer must see alone, `state_carrier` hands a mixer its initial states through transformers' own cache interface,
and `segmented` runs the mixer's own forward over those runs. Convolution and gated-delta mixers skip the padding:
`ragged` runs their forward once over the packed tokens, its convolution and scan replaced for the call by
`ragged_kernels`, which keep every segment to itself along the index tensors of `ragged_plan`.
"""

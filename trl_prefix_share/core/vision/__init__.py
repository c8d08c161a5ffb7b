"""Vision-language preference data: each pair's images encoded once, their tokens shared by both responses.

Layers: ``image_inputs`` (the processor's image tensors, cut per example, and their fingerprints), ``placement``
(collator side: which images the packed rows need and where each feature goes), ``collator`` (TRL's vision collator
plus the packed layout), ``model_kinds`` (which models are served, read from their code) and ``forward`` (model side:
encode once, gather positions and token types into the packed rows).
"""

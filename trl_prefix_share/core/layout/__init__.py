"""The shared-prefix packed layout: documents (``documents``), rows (``rows``), prefix trees (``tree``), the packed
tensors (``pack``), the index tensors of the CPU kernel (``sdpa_groups``) and moving a layout to a device
(``transfer``). Pure tensor code, no model.
"""

from trl_prefix_share.core.layout.documents import (
    IGNORE_INDEX,
    PAD_DOCUMENT,
    DocumentSpec,
    SequenceSpec,
    identical_sequences,
    make_document,
    shareable_length,
)
from trl_prefix_share.core.layout.pack import pack_documents
from trl_prefix_share.core.layout.rows import assign_rows
from trl_prefix_share.core.layout.transfer import move_to_device

__all__ = [
    "IGNORE_INDEX",
    "PAD_DOCUMENT",
    "DocumentSpec",
    "SequenceSpec",
    "assign_rows",
    "identical_sequences",
    "make_document",
    "move_to_device",
    "pack_documents",
    "shareable_length",
]

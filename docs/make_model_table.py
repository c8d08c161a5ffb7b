"""Write docs/model_support.md: for every causal-LM family of the installed transformers, what the trainers do with it.

The verdicts come from the registry test's own check (`tests/test_model_registry.py::check_family`), so the table is
what the tests assert; each family test fails when its committed row drifts from its verdict.
Run: `python docs/make_model_table.py` (about a minute on a CPU).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

HEADER = """# Model support

What `PrefixShared*Trainer` does with each causal-LM family of transformers {version}, tried on a tiny config
(2 layers, hidden size 32, sliding windows set to {window} positions) by `tests/test_model_registry.py`:

- **served exactly**: the structural check and the probe pass, and the packed log-probabilities and gradients of a
  batch with several documents per row and four responses to one prompt equal each sequence scored alone (where a
  served mixer's kernel computes in float32 whatever the model's dtype, gradients below 1e-2 of the largest are
  held against that floor: [hybrid_models.md](hybrid_models.md));
- **exact fallback**: the trainer trains exactly like the stock TRL trainer (one warning naming the reason below,
  `prefix_share/token_ratio` 1.0), or raises with `on_unsupported_model="error"`;
- **not tried**: no small config of the family builds or runs its stock forward here (the reason is given).

Regenerate with `make model-table` (`python docs/make_model_table.py` in the venv). On this release a test fails
when this table and the tests disagree; on any other release in range the tests warn with the rows that differ.

| model type | verdict |
|---|---|
"""


def main() -> None:
    import test_model_registry as registry

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    examples = registry.examples.__wrapped__()
    lines = []
    for model_type in registry.MODEL_TYPES:
        try:
            verdict = registry.check_family(model_type, examples)
        except pytest.skip.Exception as skipped:
            verdict = registry.skip_verdict(model_type, skipped.msg)
        lines.append(f"| `{model_type}` | {registry.table_cell(verdict)} |")
        print(lines[-1], flush=True)
    text = HEADER.format(version=transformers.__version__, window=registry.WINDOW) + "\n".join(lines) + "\n"
    (ROOT / "docs" / "model_support.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()

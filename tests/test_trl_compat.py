"""The TRL / transformers internals the package relies on are all present, and a missing one is named clearly."""

from __future__ import annotations

import pytest
import trl.trainer.dpo_trainer as dpo_module

from trl_prefix_share.core.trl_compat import (
    CORE_HOOKS,
    ONLINE_HOOKS,
    PAIRED_HOOKS,
    SUPPORTED,
    Hook,
    IncompatibleVersionError,
    check_hooks,
)


@pytest.mark.parametrize("hook", CORE_HOOKS + PAIRED_HOOKS + ONLINE_HOOKS, ids=lambda h: f"{h.owner}.{h.attribute}")
def test_every_hook_is_present(hook):
    assert hook.present(), f"{hook.owner}.{hook.attribute} is missing: {hook.why}"


def test_a_missing_hook_names_itself_and_the_supported_range(monkeypatch):
    monkeypatch.delattr(dpo_module.DPOTrainer, "_precompute_ref_logps")
    with pytest.raises(IncompatibleVersionError) as raised:
        check_hooks()
    message = str(raised.value)
    assert "DPOTrainer._precompute_ref_logps" in message and SUPPORTED in message
    assert "trl 1.16" in message  # the installed version is named


def test_a_missing_module_is_a_missing_hook():
    assert not Hook("trl.no_such_module", "anything", "test").present()
    with pytest.raises(IncompatibleVersionError, match="no_such_module"):
        check_hooks((Hook("trl.no_such_module", "anything", "test"),))

"""The releases this version of trl-prefix-share was tested on, and the note a newer one gets.

The structural checks read transformers' modeling code, which is refactored between minor releases. On a release newer
than the newest tested, a verdict may rest on code this project has never read, so every refusal says so, naming both
versions. `tests/test_tested_versions.py` keeps these in step with the lock (`requirements/lock.txt`) and the lowest
constraints (`requirements/lowest.txt`), which `make test` and `make test-lowest` install.
"""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

#: package -> (lowest tested, newest tested): the suite passed on both (README, "Tested releases").
TESTED_RANGES: dict[str, tuple[str, str]] = {
    "transformers": ("5.24.0", "5.25.0"),
    "trl": ("1.16.0", "1.16.0"),
}


def installed_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


@functools.cache
def version_drift_note() -> str:
    """ " (...)" naming the installed and the newest tested release of every package installed past its tested range;
    "" when all are in range."""
    notes = []
    for package, (_, newest) in TESTED_RANGES.items():
        installed = installed_version(package)
        if installed is not None and Version(installed) > Version(newest):
            notes.append(f"{package} {installed} is installed, the newest release tested is {newest}")
    if not notes:
        return ""
    return (
        f" ({'; '.join(notes)}: the newer release may have changed the modeling code the structural check reads; "
        "please report this model type with both versions)"
    )


def with_drift_note(message: str) -> str:
    """``message`` with `version_drift_note` appended once (nothing to append in the tested range)."""
    note = version_drift_note()
    return message if not note or note in message else message + note

"""Fault injection for the orchestration tests (and for trying the retries by hand).

``EMASSIST_FAULTS="register=1,preflight=always"`` makes the first attempt of the step ``register`` raise an
:class:`InjectedFault`, and every attempt of ``preflight``. Unset (the normal case) it does nothing. The fault is an
``OSError``, the kind of error the retried steps are retried for.
"""

from __future__ import annotations

import os
from collections import Counter

ENV = "EMASSIST_FAULTS"
_attempts: Counter[str] = Counter()


class InjectedFault(OSError):
    pass


def _plan() -> dict[str, str]:
    plan = {}
    for item in os.environ.get(ENV, "").split(","):
        if "=" in item:
            step, _, count = item.partition("=")
            plan[step.strip()] = count.strip()
    return plan


def maybe_fail(step: str) -> None:
    count = _plan().get(step)
    if count is None:
        return
    _attempts[step] += 1
    attempt = _attempts[step]
    if count == "always" or attempt <= int(count):
        raise InjectedFault(f"injected fault in step {step!r} (attempt {attempt}, {ENV}={os.environ[ENV]!r})")

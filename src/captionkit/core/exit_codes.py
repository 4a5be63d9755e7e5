"""One exit-code contract for every command, so scripts and CI can tell a clean run from a partial one.

0: every item done (or skipped as asked, or failures within ``--max-failures``); 1: some
items failed (the summary is printed, everything finished is kept; ``inspect``: findings
named by ``--fail-on``); 2: a usage or configuration error (nothing ran); 3: nothing
succeeded, or the run was stopped early because the backend is down; 130: Ctrl-C.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from captionkit.core.errors import CaptionkitError, NothingSucceededError

OK = 0
SOME_FAILED = 1
USAGE_ERROR = 2
NONE_SUCCEEDED = 3  # also: stopped early by the circuit breaker
INTERRUPTED = 130

CONTRACT = (
    "Exit codes: 0 every image done or skipped as asked (failures within --max-failures included); "
    "1 some failed (inspect: --fail-on findings); 2 usage or configuration error; "
    "3 none succeeded, or stopped early because the backend is down; 130 Ctrl-C."
)


@dataclass(frozen=True)
class FailureAllowance:
    """How many failed items still count as a clean run: a number, or a percentage of the items tried."""

    count: int = 0
    percent: float | None = None

    def allows(self, failed: int, tried: int) -> bool:
        if self.percent is not None:
            return failed <= math.floor(self.percent * tried / 100 + 1e-9)
        return failed <= self.count

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.count)


def parse_max_failures(value: str | None) -> FailureAllowance:
    """``--max-failures N`` or ``P%``; anything else is a usage error naming the option."""
    if value is None:
        return FailureAllowance()
    text = str(value).strip()
    fix = "write a number of images (e.g. 5) or a percentage of the images tried (e.g. 2%)"
    try:
        if text.endswith("%"):
            percent = float(text[:-1])
            if not math.isfinite(percent) or not 0 <= percent <= 100:
                raise ValueError
            return FailureAllowance(percent=percent)
        count = int(text)
        if count < 0:
            raise ValueError
        return FailureAllowance(count=count)
    except ValueError:
        raise CaptionkitError(f"--max-failures {value!r}: {fix}.") from None


def run_exit_code(*, succeeded: int, failed: int, allowance: FailureAllowance,
                  stopped_early: bool = False, interrupted: bool = False) -> int:
    """The code for one run (or one pipeline step): ``succeeded`` and ``failed`` count items, not files."""
    if stopped_early:
        return NONE_SUCCEEDED
    if interrupted:
        return INTERRUPTED
    if failed == 0 or allowance.allows(failed, succeeded + failed):
        return OK
    return NONE_SUCCEEDED if succeeded == 0 else SOME_FAILED


def exit_code_for(error: BaseException) -> int:
    """A user-facing error's code: 3 when nothing succeeded or the run was stopped early, else 2."""
    return NONE_SUCCEEDED if isinstance(error, NothingSucceededError) else USAGE_ERROR

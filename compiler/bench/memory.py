"""Host memory: the peak RSS of a block of work, from Linux's resettable high-water mark."""

from __future__ import annotations

import os
import re

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(match.group(1)) if match else None
    except OSError:
        return None


class PeakRSS:
    """Context manager: ``delta_mib`` is the host peak RSS inside the block minus the RSS before it.

    Uses Linux's resettable high-water mark (``/proc/self/clear_refs`` ← 5, then ``VmHWM``); where
    that is unavailable ``delta_mib`` stays ``None``: a lifetime peak must not pass as this case's.
    """

    def __init__(self) -> None:
        self.delta_mib: float | None = None
        self._before: int | None = None

    @staticmethod
    def supported() -> bool:
        return os.access(_CLEAR_REFS, os.W_OK) and _status_kib("VmHWM") is not None

    def __enter__(self) -> PeakRSS:
        if self.supported():
            try:
                with open(_CLEAR_REFS, "w") as f:
                    f.write("5")
                self._before = _status_kib("VmRSS")
            except OSError:
                self._before = None
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kib("VmHWM")
        if self._before is not None and peak is not None:
            self.delta_mib = max(0, peak - self._before) / 1024.0

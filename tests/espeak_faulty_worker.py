"""An espeak worker whose mu-law encoder fails on its first call (tests/test_espeak.py).

``python espeak_faulty_worker.py COUNT_FILE --library ... --data ...``: each call of the encoder appends
one byte to COUNT_FILE, so the test can count them from its own process; the first call raises.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tts_streamer.adapters import espeak_worker

_real_encode: Callable[[np.ndarray[Any, Any]], bytes] = espeak_worker.__dict__["ulaw_encode"]
_count = Path(sys.argv[1])


def _encode_failing_once(pcm: np.ndarray[Any, Any]) -> bytes:
    with _count.open("ab") as handle:
        handle.write(b".")
    if _count.stat().st_size == 1:
        raise ValueError("encoder broke")
    return _real_encode(pcm)


setattr(espeak_worker, "ulaw_encode", _encode_failing_once)  # noqa: B010 (the worker's own name)

if __name__ == "__main__":
    raise SystemExit(espeak_worker.main(sys.argv[2:]))

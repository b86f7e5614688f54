"""What flows from the Vendor actor to the MediaSocket actor: 8 kHz mu-law, tagged by utterance.

Utterance numbers grow within a session; a flush declares every utterance below a number dead, so
audio that was already in flight when the flush happened is recognisable and dropped.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class AudioChunk:
    utterance: int
    data: bytes


@attrs.frozen
class UtteranceEnd:
    """No more audio for this utterance: pad its last frame and report when it has played out."""

    utterance: int


AudioItem = AudioChunk | UtteranceEnd

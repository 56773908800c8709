"""What both alignment methods check first: the text has words and the audio has speech."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from worker.alignment.normalise import split_words
from worker.alignment.speech import Audio, SpeechRegions, as_float32, find_regions
from worker.alignment.types import AlignmentFailed, FailureReason


@dataclass
class AlignInput:
    """The text's words, the audio as float32 samples, and where in it there is speech."""

    words: list[str]
    samples: npt.NDArray[np.float32]
    regions: SpeechRegions


def align_input(audio: Audio, text: str, method: str) -> AlignInput | AlignmentFailed:
    """The input of an alignment, or the failure (by `method`) when there is nothing to align."""
    words = split_words(text)
    if not words:
        return AlignmentFailed(FailureReason.EMPTY_TEXT, "the text has no words", method)
    samples = as_float32(audio)
    regions = find_regions(samples)
    if not regions.spans:
        return AlignmentFailed(FailureReason.NO_SPEECH, "no speech found in the audio", method)
    return AlignInput(words, samples, regions)

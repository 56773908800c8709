"""The align stage's pure parts: chunk texts, the model's own words, the stored document, who gets aligned."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from core.statuses import AlignmentStatus, Timestamps, default_timestamps, effective_timestamps
from core.subtitles import Word
from worker.align_stage import (
    ChunkText,
    _Outcome,
    alignment_document,
    chunk_texts,
    model_words,
    spelled_as_text,
)
from worker.audio import TimeMap
from worker.completion import alignments_to_request
from worker.store.transcripts import AlignInput

# Trimmed [0, 10) is original [1, 11); trimmed [10, 20) is original [15, 25): 4 s of silence cut at 10.
TMAP = TimeMap(intervals=[(0.0, 1.0, 10.0), (10.0, 15.0, 10.0)], chunks=[(0.0, 10.0), (10.0, 20.0)])


def _input(segments: list[dict[str, Any]], timestamps: Timestamps = Timestamps.SEGMENT) -> AlignInput:
    return AlignInput(
        job_id=uuid.uuid4(),
        tenant_id=uuid.uuid4(),
        object_key="k",
        source_uri=None,
        duration_seconds=26.0,
        time_map=TMAP.to_json(),
        profile="podcast",
        text=" ".join(s["text"] for s in segments),
        language="en",
        segments=segments,
        timestamps=timestamps,
    )


def test_each_chunk_gets_the_segments_whose_middle_is_inside_it() -> None:
    # A text-only model's segments: one per chunk, spanning it in original time.
    segments = [
        {"start": 1.0, "end": 11.0, "text": "First chunk."},
        {"start": 15.0, "end": 25.0, "text": "Second chunk."},
        {"start": 24.0, "end": 24.5, "text": "   "},  # no text: ignored
        {"text": "no times"},
    ]
    chunks = chunk_texts(segments, TMAP)
    assert [(c.index, c.start, c.end, c.text) for c in chunks] == [
        (0, 0.0, 10.0, "First chunk."),
        (1, 10.0, 20.0, "Second chunk."),
    ]


def test_a_file_without_a_chunk_plan_is_one_chunk() -> None:
    tmap = TimeMap(intervals=[(0.0, 0.5, 8.0)])
    chunks = chunk_texts([{"start": 0.5, "end": 8.5, "text": "Hello there."}], tmap)
    assert [(c.start, c.end, c.text) for c in chunks] == [(0.0, 8.0, "Hello there.")]
    assert chunk_texts([{"start": 0, "end": 1, "text": "x"}], TimeMap(intervals=[])) == []


def test_the_models_own_words_are_used_only_when_every_segment_has_them() -> None:
    timed = [
        {
            "start": 0.0,
            "end": 1.0,
            "text": "a b",
            "words": [{"word": "a", "start": 0, "end": 0.4}, {"word": "b", "start": 0.5, "end": 1.0}],
        },
        {"start": 1.0, "end": 2.0, "text": "c", "words": [{"word": "c", "start": 1.2, "end": 1.8}]},
    ]
    assert model_words(timed) == [Word("a", 0, 0.4), Word("b", 0.5, 1.0), Word("c", 1.2, 1.8)]
    assert model_words([*timed, {"start": 2.0, "end": 3.0, "text": "d"}]) is None
    assert model_words([]) is None


def _outcome(chunk: ChunkText, source: str, words: list[Word], reason: str | None = None) -> _Outcome:
    from core.subtitles import build_segments, segments_from_json

    cues = build_segments(words) if words else segments_from_json(chunk.segments)
    return _Outcome(chunk, source, words=words, cues=cues, reason=reason, detail=reason)


def test_the_document_is_aligned_partial_or_failed_and_keeps_words_only_for_word() -> None:
    first = ChunkText(0, 0.0, 10.0, [{"start": 1.0, "end": 11.0, "text": "Hello there. Bye now."}])
    second = ChunkText(1, 10.0, 20.0, [{"start": 15.0, "end": 25.0, "text": "Second chunk."}])
    words = [Word("Hello", 1.2, 1.5), Word("there.", 1.6, 2.0), Word("Bye", 3.0, 3.3), Word("now.", 3.4, 3.8)]
    aligned = _outcome(first, "aligned", words)
    failed = _outcome(second, "failed", [], reason="no_speech")

    doc = alignment_document(_input(first.segments, Timestamps.WORD), [aligned], TMAP)
    assert doc["status"] == AlignmentStatus.ALIGNED.value and doc["method"] == "whisper_align"
    assert [s["text"] for s in doc["segments"]] == ["Hello there.", "Bye now."]
    assert [w["word"] for w in doc["words"]] == ["Hello", "there.", "Bye", "now."]
    assert "reason" not in doc

    doc = alignment_document(_input(first.segments + second.segments), [aligned, failed], TMAP)
    assert doc["status"] == AlignmentStatus.PARTIAL.value and doc["reason"] == "no_speech"
    assert doc["words"] == []  # `segment` keeps cues only
    # The failed chunk keeps its own segment as one cue, after the aligned ones.
    assert [s["text"] for s in doc["segments"]] == ["Hello there.", "Bye now.", "Second chunk."]
    assert [c["source"] for c in doc["chunks"]] == ["aligned", "failed"]
    assert doc["chunks"][1]["start"] == 15.0 and doc["chunks"][1]["end"] == 25.0

    doc = alignment_document(_input(second.segments), [failed], TMAP)
    assert doc["status"] == AlignmentStatus.FAILED.value and doc["segments"] == []
    assert doc["reason"] == "no_speech"

    doc = alignment_document(_input([]), [], TMAP)
    assert doc["status"] == AlignmentStatus.FAILED.value and doc["reason"] == "empty_text"


@pytest.mark.parametrize(
    ("profile", "chosen", "expected"),
    [
        ("podcast", None, Timestamps.SEGMENT),
        ("voicemail", None, Timestamps.NONE),
        ("auto", None, Timestamps.NONE),
        ("voicemail", "word", Timestamps.WORD),
        ("podcast", "none", Timestamps.NONE),
    ],
)
def test_timestamps_default_by_profile(profile: str, chosen: str | None, expected: Timestamps) -> None:
    assert effective_timestamps(profile, chosen) == expected
    assert default_timestamps("podcast") == Timestamps.SEGMENT


def test_completion_asks_for_alignment_only_when_timestamps_are_wanted_and_there_is_text() -> None:
    asked = alignments_to_request(
        [
            ("some text", "podcast", None),
            ("some text", "voicemail", None),
            ("", "podcast", "word"),
            ("text", "auto", "word"),
        ]
    )
    assert asked[1] is None and asked[2] is None
    assert asked[0] is not None and asked[0][1] == Timestamps.SEGMENT
    assert asked[3] is not None and asked[3][1] == Timestamps.WORD
    assert asked[0][0] != asked[3][0]  # a token of its own each


def test_the_models_words_are_carried_onto_the_texts_spelling_so_cues_break_at_sentences() -> None:
    from core.subtitles import build_segments

    # whisper-1's words carry no punctuation; the local model splits "make-a-wish" into "-a" pieces.
    own = [
        Word("Hello", 0.0, 0.4),
        Word("there", 0.5, 0.9),
        Word("make", 1.0, 1.2),
        Word("-a", 1.2, 1.3),
        Word("-wish", 1.3, 1.6),
        Word("Bye", 1.8, 2.0),
    ]
    words = spelled_as_text("Hello there, make-a-wish. Bye!", own)
    assert [w.word for w in words] == ["Hello", "there,", "make-a-wish.", "Bye!"]
    assert (words[2].start, words[2].end) == (1.0, 1.6)
    assert [s.text for s in build_segments(words)] == ["Hello there, make-a-wish.", "Bye!"]
    assert spelled_as_text("something else entirely", own) == own  # no match: the model's words stay


def test_a_broker_error_sending_align_tasks_is_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import completion, dispatch

    sent: list[uuid.UUID] = []

    def send(job_id: uuid.UUID, token: str) -> None:
        if not sent:
            sent.append(job_id)
            raise ConnectionError("broker down")
        sent.append(job_id)

    monkeypatch.setattr(dispatch, "send_align", send)
    first, second = uuid.uuid4(), uuid.uuid4()
    completion.send_aligns({first: ("t1", Timestamps.SEGMENT), second: ("t2", Timestamps.WORD)})
    assert sent == [first, second]  # the job succeeded anyway; the next one is still sent

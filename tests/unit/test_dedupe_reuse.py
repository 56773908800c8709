"""Which transcript of identical audio a batch may reuse: only one at least as good as its first choice
(issue #16, item 22e). The rules are pure (core.dedupe); tests/integration/test_dedupe_chains.py runs
them through prepare and completion."""

from __future__ import annotations

import pytest

from core.dedupe import may_follow, may_reuse, takes_leader_outcome, transcript_models

MINI, FOUR, WHISPER, LOCAL = "gpt-4o-mini-transcribe", "gpt-4o-transcribe", "whisper-1", "local"


@pytest.mark.parametrize(
    ("models", "chain", "reused"),
    [
        ([FOUR], [FOUR, MINI, LOCAL], True),  # the first choice itself
        (["local:base"], [FOUR, MINI, LOCAL], False),  # the case: local is not gpt-4o-transcribe
        ([MINI], [FOUR, MINI], False),  # a fallback of the chain ranks below its first choice
        ([WHISPER], [FOUR], False),  # another hosted model
        ([FOUR, MINI], [FOUR, MINI], False),  # chunks partly from the fallback
        ([MINI], [LOCAL], True),  # hosted is at least as good as local
        (["local:base"], [LOCAL], True),
        (["none"], [FOUR], True),  # no speech: no model wrote it
    ],
)
def test_a_finished_twin_is_reused_only_from_the_first_choice(
    models: list[str], chain: list[str], reused: bool
) -> None:
    assert may_reuse(models, chain) is reused


@pytest.mark.parametrize(
    ("leader_chain", "chain", "follows"),
    [
        ([MINI, WHISPER], [MINI], True),  # the same first choice
        ([MINI], [FOUR, MINI], False),
        ([LOCAL], [MINI], False),  # a local-first leader writes a local transcript
        ([FOUR], [LOCAL], True),  # a local-first batch takes anything
    ],
)
def test_a_twin_in_flight_is_followed_only_with_the_same_first_choice(
    leader_chain: list[str], chain: list[str], follows: bool
) -> None:
    assert may_follow(leader_chain, chain) is follows


@pytest.mark.parametrize(
    ("models", "chain", "takes"),
    [
        ([MINI], [MINI, WHISPER], True),
        ([WHISPER], [MINI, WHISPER], True),  # the leader fell back as the follower would have
        ([WHISPER], [MINI], False),  # a fallback the follower never accepts
        (["local:base"], [MINI, WHISPER, LOCAL], False),  # local only for a local-first chain
        (["local:base"], [LOCAL, MINI], True),
    ],
)
def test_a_follower_takes_its_leaders_outcome_only_from_its_own_chain(
    models: list[str], chain: list[str], takes: bool
) -> None:
    assert takes_leader_outcome(models, chain) is takes


def test_a_transcripts_models_are_its_pieces_models_when_recorded() -> None:
    assert transcript_models(MINI, {"models": [MINI, WHISPER]}) == [MINI, WHISPER]
    assert transcript_models(MINI, {"deduplicated_from": "x"}) == [MINI]  # a copy names its source's
    assert transcript_models(MINI, None) == [MINI]

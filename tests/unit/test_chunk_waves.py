"""Which chunks of a long file are sent together, and which text prompts each (worker.waves)."""

from __future__ import annotations

from worker.waves import Send, plan_waves


def test_alternate_sends_even_chunks_then_odd_ones_prompted_by_their_predecessors() -> None:
    assert plan_waves(5, set(), "alternate") == [
        [Send(0, None), Send(2, None), Send(4, None)],
        [Send(1, 0), Send(3, 2)],
    ]
    assert plan_waves(1, set(), "alternate") == [[Send(0, None)]]
    assert plan_waves(2, set(), "alternate") == [[Send(0, None)], [Send(1, 0)]]


def test_every_mode_sends_each_pending_chunk_once_and_prompts_only_with_earlier_waves() -> None:
    for mode in ("alternate", "sequential", "none"):
        for count in range(1, 9):
            for done in (set(), {0}, {1}, {2, 3}, {count - 1}, set(range(0, count, 3))):
                waves = plan_waves(count, done, mode)  # type: ignore[arg-type]
                sent = [s.position for wave in waves for s in wave]
                assert sorted(sent) == sorted(set(range(count)) - done)
                known = set(done)
                for wave in waves:
                    for s in wave:
                        assert s.context is None or (s.context == s.position - 1 and s.context in known)
                    known |= {s.position for s in wave}
                if mode == "alternate":
                    assert len(waves) <= 2


def test_stored_chunks_are_never_sent_and_prompt_their_successor() -> None:
    # Chunk 1 came from an earlier run: chunk 2 starts a new run in wave 1, prompted by chunk 1's text.
    assert plan_waves(5, {1}, "alternate") == [
        [Send(0, None), Send(2, 1), Send(4, None)],
        [Send(3, 2)],
    ]
    assert plan_waves(4, {0, 1, 2, 3}, "alternate") == []
    assert plan_waves(3, {0}, "sequential") == [[Send(1, 0)], [Send(2, 1)]]


def test_sequential_prompts_every_seam_and_none_prompts_no_seam() -> None:
    assert plan_waves(3, set(), "sequential") == [[Send(0, None)], [Send(1, 0)], [Send(2, 1)]]
    assert plan_waves(3, {1}, "none") == [[Send(0, None), Send(2, None)]]
    # Every seam (i-1, i) has context in sequential; every other one in alternate; none in none.
    seams = {
        mode: sum(1 for w in plan_waves(6, set(), mode) for s in w if s.context is not None)  # type: ignore[arg-type]
        for mode in ("sequential", "alternate", "none")
    }
    assert seams == {"sequential": 5, "alternate": 3, "none": 0}

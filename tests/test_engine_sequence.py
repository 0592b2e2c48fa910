"""A sequence's view once the step that runs it is in: what the engine plans the next step on
while the device still computes this one."""

from __future__ import annotations

from neod.engine import SamplingParams
from neod.engine.sequence import Sequence
from neod.sched import Residence, SeqView


def running(num_tokens: int, num_computed: int, max_tokens: int = 50) -> Sequence:
    seq = Sequence(3, "r3", list(range(100)), SamplingParams(max_tokens=max_tokens), 4096, None)
    seq.token_ids += list(range(num_tokens - 100))
    seq.num_computed_tokens, seq.residence = num_computed, Residence.GPU
    return seq


def view(computed: int, prompt: int = 100, left: int = 0, max_total: int = 150) -> SeqView:
    return SeqView(3, 3, prompt, computed, max_total, Residence.GPU, 7, left)


def test_a_chunk_of_a_prompt_leaves_the_rest_to_prefill():
    seq = running(100, 0)
    seq.chunk_tokens = 40
    assert seq.view_after_step(7) == view(40, left=60)
    seq.num_computed_tokens, seq.chunk_tokens = 40, 30
    assert seq.view_after_step(7) == view(70, left=30)


def test_the_last_chunk_and_a_decode_sample_one_token():
    seq = running(100, 40)  # the rest of the prompt, then its first token
    assert seq.view_after_step(7) == view(100)
    assert running(120, 119).view_after_step(7) == view(120)


def test_a_recomputed_history_counts_only_the_prompt_as_prompt():
    seq = running(105, 0)  # preempted after 5 tokens, prefilled again whole
    assert seq.view().num_prompt_tokens == 105  # all of it to prefill
    assert seq.view_after_step(7) == view(105)


def test_a_sequence_the_step_ends_on_length_has_no_view():
    assert running(149, 148).view_after_step(7) is None  # its 150th token is its last
    assert running(148, 147).view_after_step(7) == view(148)

"""BatchedModel with real llama.cpp and tiny models: slots, queueing, chunked prompts, close, drain, stress."""

from __future__ import annotations

import logging
import os
import random
import threading
import time

import pytest

from inference_worker.batch_prompt import BatchRequest, PromptTooLong
from inference_worker.batch_stream import GenerationFailed, ModelClosing
from inference_worker.batching import BatchedModel
from tests.support.gates import Gate

log = logging.getLogger(__name__)
PROMPTS = [f"prompt {i}: the quick brown fox" for i in range(6)]


def greedy(prompt: str, max_tokens: int = 24) -> BatchRequest:
    return BatchRequest(prompt=prompt, max_tokens=max_tokens, temperature=0)


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def tiny(make_model, tmp_path):
    return make_model(tmp_path, "t1.gguf", seed=1)


def open_model(path, **kw) -> BatchedModel:
    kw.setdefault("n_ctx_per_slot", 256)
    kw.setdefault("n_parallel", 4)
    return BatchedModel(path, n_threads=1, **kw)


def reference_texts(path, prompts, max_tokens=24) -> dict[str, str]:
    """Each prompt alone on a one-slot model."""
    with open_model(path, n_parallel=1) as bm:
        return {p: bm.submit(greedy(p, max_tokens)).text() for p in prompts}


def test_streams_in_one_batch_get_their_own_text(tiny):
    """The first stream is held at a Gate until the other five are queued, so three of them join
    it in the four slots whatever the machine's speed."""
    want = reference_texts(tiny, PROMPTS)
    gate = Gate()
    with open_model(tiny, on_step=gate) as bm:
        streams = [bm.submit(greedy(PROMPTS[0]))]
        wait_until(lambda: gate.steps == 1)
        streams += [bm.submit(greedy(p)) for p in PROMPTS[1:]]
        gate.open()
        assert {p: s.text() for p, s in zip(PROMPTS, streams)} == want
        assert all(s.finish_reason == "length" and s.completion_tokens == 24 for s in streams)
        idle = bm.stats()
    stats = bm.stats()  # after close(): the decode thread has counted and reported its last step
    steps = gate.infos
    assert max(s.sequences for s in steps) == 4, "four slots decode together"
    assert idle.active == 0 and idle.queued == 0
    assert stats.tokens_generated == 24 * len(PROMPTS)
    assert stats.steps == len(steps) and stats.batch_tokens == sum(s.tokens for s in steps)


def test_requests_beyond_the_slots_wait_in_arrival_order(tiny):
    gate = Gate()
    with open_model(tiny, n_parallel=1, on_step=gate) as bm:
        first = bm.submit(greedy(PROMPTS[0], 200))
        wait_until(lambda: gate.steps == 1)
        b, c, d = (bm.submit(greedy(p, 8)) for p in PROMPTS[1:4])
        assert bm.stats().queued == 3 and bm.stats().active == 1
        first.close()
        gate.open()
        d.text()
        # One slot serves them one after another: the last to arrive ends after the others.
        assert b.finish_reason == "length" and c.finish_reason == "length"
        assert first.finish_reason == "cancelled"


def test_long_prompt_is_evaluated_in_chunks_beside_generating_streams(tiny):
    long_prompt = "word " * 30
    want = reference_texts(tiny, [long_prompt], max_tokens=40)
    steps = []

    def slow_step(info) -> None:
        steps.append(info)
        time.sleep(0.002)  # keeps the busy stream running for seconds, far longer than needed

    with open_model(tiny, n_parallel=2, n_ctx_per_slot=1024, prompt_chunk=16, on_step=slow_step) as bm:
        busy = bm.submit(greedy("short", 1000))
        wait_until(lambda: len(steps) > 1)
        long = bm.submit(greedy(long_prompt, 40))
        assert long.prompt_tokens > 100
        assert long.text() == want[long_prompt]
        assert busy.finish_reason is None, "still generating"
        busy.close()
    assert all(s.tokens <= 16 + 2 for s in steps), "no step takes more than one prompt chunk"
    mixed = [s for s in steps if s.sequences == 2 and s.tokens > 2]
    assert len(mixed) >= long.prompt_tokens // 16, "the busy stream kept generating while the long prompt was read"


class Stepper:
    """An on_step callback that lets the decode loop take one step per release()."""

    def __init__(self):
        self.steps: list = []
        self._permits = threading.Semaphore(0)
        self._expired = False

    def __call__(self, info) -> None:
        self.steps.append(info)
        if not self._expired and not self._permits.acquire(timeout=30):
            self._expired = True  # a test that failed mid-way must not hang close()

    def release(self, n: int = 1) -> None:
        self._permits.release(n)


def test_a_joining_prompt_gets_a_step_of_its_own_but_never_two_in_a_row(tiny):
    stepper = Stepper()
    with open_model(tiny, n_parallel=4, on_step=stepper) as bm:
        busy = bm.submit(greedy(PROMPTS[0], 200))
        wait_until(lambda: len(stepper.steps) == 1)  # busy's prompt
        stepper.release()
        wait_until(lambda: len(stepper.steps) == 2)  # busy's first generated token
        joiners = [bm.submit(greedy(p, 8)) for p in PROMPTS[1:3]]
        stepper.release()
        wait_until(lambda: len(stepper.steps) == 3)
        stepper.release()
        wait_until(lambda: len(stepper.steps) == 4)
        own, mixed = stepper.steps[2], stepper.steps[3]
        assert (own.sequences, own.tokens, own.generated) == (2, sum(j.prompt_tokens for j in joiners), 2)
        assert (mixed.sequences, mixed.tokens, mixed.generated) == (3, 3, 3)
        busy.close()
        stepper.release(10_000)


def test_closing_a_stream_frees_its_slot_and_sequence(tiny):
    want = reference_texts(tiny, PROMPTS[:1])
    gate = Gate()
    with open_model(tiny, n_parallel=1, on_step=gate) as bm:
        long = bm.submit(greedy(PROMPTS[1], 200))
        wait_until(lambda: gate.steps == 1)
        waiting = bm.submit(greedy(PROMPTS[0]))
        long.close()
        gate.open()
        # The waiting request takes the freed slot; a sequence left in the KV cache would
        # clash with its positions (llama_decode fails) or change its text.
        assert waiting.text() == want[PROMPTS[0]]
        assert long.finish_reason == "cancelled" and long.completion_tokens == 1
        wait_until(lambda: bm.stats().active == 0)


def test_closing_a_queued_stream_drops_it(tiny):
    gate = Gate()
    with open_model(tiny, n_parallel=1, on_step=gate) as bm:
        first = bm.submit(greedy(PROMPTS[0], 50))
        wait_until(lambda: gate.steps == 1)
        queued = bm.submit(greedy(PROMPTS[1]))
        queued.close()
        gate.open()
        assert list(queued) == [] and queued.finish_reason == "cancelled"
        assert first.text() and first.finish_reason == "length"


def test_prompt_that_does_not_fit_a_slot_is_refused(tiny):
    with open_model(tiny, n_ctx_per_slot=256) as bm:
        assert bm.n_ctx_per_slot == 256
        with pytest.raises(PromptTooLong) as err:
            bm.submit(greedy("x " * 200))
        assert err.value.n_ctx == 256 and err.value.tokens == 400
        stream = bm.submit(BatchRequest(prompt="hello", max_tokens=1000, temperature=0))
        stream.text()
        assert stream.finish_reason == "length" and stream.prompt_tokens + stream.completion_tokens == 256


def test_drain_waits_for_running_and_queued_then_refuses(tiny):
    with open_model(tiny, n_parallel=1) as bm:
        streams = [bm.submit(greedy(p, 40)) for p in PROMPTS[:2]]
        assert bm.drain(timeout=30)
        assert all(s.finish_reason == "length" and len(s.text()) for s in streams)
        with pytest.raises(ModelClosing):
            bm.submit(greedy("late"))


def test_drain_that_times_out_accepts_again(tiny):
    gate = Gate()
    with open_model(tiny, n_parallel=1, on_step=gate) as bm:
        long = bm.submit(greedy(PROMPTS[0], 200))
        wait_until(lambda: gate.steps == 1)
        assert not bm.drain(timeout=0.05)
        long.close()
        gate.open()
        assert bm.submit(greedy(PROMPTS[1], 4)).text()


def test_close_fails_streams_that_outlive_the_timeout(tiny):
    """The gate opens only once close() has begun stopping, so both streams are still unfinished
    when it gives up waiting, however fast the machine."""
    gate = Gate()
    bm = open_model(tiny, n_parallel=1, on_step=gate)
    running = bm.submit(greedy(PROMPTS[0], 200))
    queued = bm.submit(greedy(PROMPTS[1]))
    wait_until(lambda: gate.steps == 1)

    def open_when_stopping() -> None:
        wait_until(lambda: bm._loop._stopping)  # close() gave up draining; it now waits for the held step
        gate.open()

    opener = threading.Thread(target=open_when_stopping)
    opener.start()
    bm.close(timeout=0)
    opener.join(timeout=10)
    for stream in (running, queued):
        with pytest.raises(GenerationFailed):
            stream.text()
    with pytest.raises(ModelClosing):
        bm.submit(greedy("after"))
    bm.close()  # idempotent


def test_chat_uses_the_model_template(tiny):
    with open_model(tiny) as bm:
        stream = bm.submit(BatchRequest(messages=({"role": "user", "content": "hi"},), max_tokens=4, temperature=0))
        stream.text()
        # No template in the tiny model: llama-cpp-python falls back to its llama-2 format.
        assert stream.prompt_tokens > len("hi") + 4


def test_random_disconnects_leave_no_slot_and_no_foreign_text(make_model, tmp_path):
    """16 clients on two models, closing streams early at random, for a bounded time."""
    paths = {name: make_model(tmp_path, name, seed=seed) for name, seed in (("a.gguf", 11), ("b.gguf", 12))}
    want = {name: reference_texts(path, PROMPTS, max_tokens=32) for name, path in paths.items()}
    assert want["a.gguf"] != want["b.gguf"]
    seconds = float(os.environ.get("BATCH_STRESS_SECONDS", "6"))
    models = {name: open_model(path, n_parallel=4) for name, path in paths.items()}
    errors: list[str] = []
    done = {"full": 0, "closed": 0}

    def client(seed: int) -> None:
        rng = random.Random(seed)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            name, prompt = rng.choice(list(paths)), rng.choice(PROMPTS)
            stream = models[name].submit(greedy(prompt, 32))
            keep = rng.randint(0, 12) if rng.random() < 0.5 else None
            text, closed = "", False
            for piece in stream:
                text += piece
                if keep is not None and len(text) >= keep:
                    stream.close()
                    closed = True
                    break
            if not closed:
                done["full"] += 1
                if text != want[name][prompt]:
                    errors.append(f"{name} {prompt!r}: {text!r}")
            else:
                done["closed"] += 1
                if not want[name][prompt].startswith(text):
                    errors.append(f"{name} {prompt!r} (closed): {text!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=seconds + 60)
        assert not any(t.is_alive() for t in threads)
        for bm in models.values():
            wait_until(lambda: bm.stats().active == 0 and bm.stats().queued == 0)
    finally:
        for bm in models.values():
            bm.close(timeout=10)
    log.info("stress: %s in %.0f s; %s", done, seconds, [bm.stats() for bm in models.values()])
    assert not errors, errors[:5]
    assert done["full"] > 16 and done["closed"] > 16, done


def test_a_file_llama_cpp_cannot_load_raises(tiny, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny.read_bytes()[:1000])
    with pytest.raises(ValueError):
        open_model(broken)

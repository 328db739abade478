"""The RDMA transfer protocol end to end over the in-process loopback pair (not RDMA) into a real ModelCache."""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from inference_worker.storage import ModelCache
from inference_worker.testing.tiny_gguf import write_tiny_gguf
from model_swap.digest import sha256_file
from model_swap.errors import ApiError
from model_swap.rdma import transfer_failed
from model_swap.rdma.inprocess import InProcessChannel
from model_swap.rdma.protocol import (CONTROL_DEPTH, HEADER, MAGIC, VERSION, ChannelSpec, Kind, parse, receive_file,
                                      send_file)

TIMEOUT_S = 5.0


@dataclass
class Outcome:
    """Both ends of one transfer: what each returned or raised, and the channels for their counters."""

    sender: InProcessChannel
    receiver: InProcessChannel
    report: object = None
    receipt: object = None
    sender_error: ApiError | None = None
    receiver_error: ApiError | None = None


def transfer(sink, path: Path, name: str = "tiny.gguf", *, chunk: int = 4096, depth: int = 4,
             control_depth: int = CONTROL_DEPTH, receiver_chunk: int | None = None, size: int | None = None,
             sha256: str | None = None, break_after: int | None = None, token: str | None = None,
             sender_token: str | None = None, timeout_s: float = TIMEOUT_S) -> Outcome:
    """Run receive_file on a thread and send_file here, over a fresh loopback pair."""
    sender, receiver = InProcessChannel.pair(ChannelSpec.for_sender(chunk, depth, control_depth),
                                             ChannelSpec.for_receiver(receiver_chunk or chunk, depth),
                                             break_after=break_after)
    outcome = Outcome(sender, receiver)

    def serve() -> None:
        try:
            outcome.receipt = receive_file(receiver, sink, token=token, timeout_s=timeout_s)
        except ApiError as err:
            outcome.receiver_error = err
        finally:
            receiver.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        outcome.report = send_file(sender, name, path, path.stat().st_size if size is None else size,
                                   sha256_file(path) if sha256 is None else sha256,
                                   token=sender_token, timeout_s=timeout_s)
    except ApiError as err:
        outcome.sender_error = err
    finally:
        sender.close()
    thread.join(2 * timeout_s)
    assert not thread.is_alive(), "the receiver did not finish"
    return outcome


@pytest.fixture
def cache(tmp_path: Path) -> ModelCache:
    return ModelCache(tmp_path / "cache", max_model_bytes=1 << 30, reserve_disk_bytes=0)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    (tmp_path / "store").mkdir()
    return write_tiny_gguf(tmp_path / "store" / "tiny.gguf", seed=7)


def cache_files(cache: ModelCache) -> list[str]:
    """Every file in the cache directory, temporary ones included."""
    return sorted(p.name for p in cache.root.iterdir())


def post(channel: InProcessChannel, kind: Kind, seq: int = 0, body: dict | None = None) -> None:
    """Send one hand-made message, as a misbehaving peer would."""
    payload = json.dumps(body).encode() if body is not None else b""
    buffer = channel.send_buffer(0)
    HEADER.pack_into(buffer.view, 0, MAGIC, VERSION, kind, 0, seq, len(payload))
    buffer.view[HEADER.size:HEADER.size + len(payload)] = payload
    channel.send(buffer, HEADER.size + len(payload))


def credit_messages(depth: int, control_depth: int, chunks: int) -> int:
    """How many CREDITs the receiver sends: one per full batch, a batch sized so they fit the sender's ring."""
    return chunks // -(-depth // (control_depth - 1))


# (chunk, depth, control depth): odd chunk sizes, the defaults (6 and 8: batches of 1), batches of
# 2 (8, 8) and 4 (8, 3), and the smallest control ring (2: one CREDIT for all the credits at once).
TRANSFERS = [(1000, 4, 8), (4093, 6, 8), (65536, 4, 8), (1 << 20, 4, 8), (3001, 8, 8), (4093, 8, 2),
             (1000, 8, 3), (777, 3, 2), (5003, 16, 2), (65521, 16, 5)]


@pytest.mark.parametrize("chunk, depth, control_depth", TRANSFERS)
def test_real_gguf_lands_in_the_cache_byte_for_byte(cache: ModelCache, model: Path, chunk: int, depth: int,
                                                    control_depth: int) -> None:
    size = model.stat().st_size
    assert chunk >= size or size % chunk, "want chunk sizes that leave a short last chunk"
    outcome = transfer(cache, model, chunk=chunk, depth=depth, control_depth=control_depth)
    assert outcome.sender_error is None and outcome.receiver_error is None
    assert (cache.root / "tiny.gguf").read_bytes() == model.read_bytes()
    assert outcome.receipt.sha256 == sha256_file(model) == outcome.report.sha256
    chunks = math.ceil(size / chunk)
    assert outcome.report.chunks == chunks
    assert outcome.report.receiver["ok"] is True
    # READY, the CREDITs, RESULT: a batch too small would overrun the sender's control ring (the
    # loopback pair fails such a SEND), one too large would send fewer CREDITs than counted here.
    assert outcome.receiver.messages_sent == 2 + credit_messages(depth, control_depth, chunks)
    assert cache_files(cache) == ["tiny.gguf"]
    assert [m.name for m in cache.list()] == ["tiny.gguf"]


def test_chunk_size_is_the_smaller_of_the_two_ends(cache: ModelCache, model: Path) -> None:
    outcome = transfer(cache, model, chunk=8192, receiver_chunk=3000)
    assert outcome.report.chunk == 3000
    assert outcome.report.chunks == math.ceil(model.stat().st_size / 3000)
    assert (cache.root / "tiny.gguf").read_bytes() == model.read_bytes()


class SlowSink:
    """The cache, writing each block a little late, so the sender runs out of credits."""

    def __init__(self, cache: ModelCache, delay_s: float):
        self.cache = cache
        self.delay_s = delay_s

    def check_room(self, size):
        self.cache.check_room(size)

    def receive(self, name, blocks, size, sha256):
        def late():
            for block in blocks:
                time.sleep(self.delay_s)
                yield block

        return self.cache.receive(name, late(), size, sha256)


@pytest.mark.parametrize("depth, control_depth", [(3, 8), (8, 8), (8, 2), (6, 3)])
def test_credits_limit_the_chunks_in_flight(cache: ModelCache, model: Path, depth: int, control_depth: int) -> None:
    outcome = transfer(SlowSink(cache, 0.002), model, chunk=8192, depth=depth, control_depth=control_depth)
    assert outcome.sender_error is None and outcome.receiver_error is None
    # The loopback pair fails any SEND without a posted receive, as verbs would (RNR): that the
    # transfer finished means credits never let the sender overrun; the peak shows they were all used.
    assert outcome.receiver.peak_in_use == depth
    assert outcome.report.credit_waits > 0
    chunks = math.ceil(model.stat().st_size / 8192)
    assert outcome.receiver.messages_sent == 2 + credit_messages(depth, control_depth, chunks)
    assert (cache.root / "tiny.gguf").read_bytes() == model.read_bytes()


class HoardingSink:
    """The cache, handed every block only once the transfer is over: blocks must outlive their buffers."""

    def __init__(self, cache: ModelCache):
        self.cache = cache

    def check_room(self, size):
        self.cache.check_room(size)

    def receive(self, name, blocks, size, sha256):
        return self.cache.receive(name, iter(list(blocks)), size, sha256)


def test_blocks_stay_intact_after_their_buffer_is_reused(cache: ModelCache, model: Path) -> None:
    outcome = transfer(HoardingSink(cache), model, chunk=4096, depth=2)
    assert outcome.sender_error is None and outcome.receiver_error is None
    assert (cache.root / "tiny.gguf").read_bytes() == model.read_bytes()


def test_the_loopback_pair_refuses_a_send_with_no_receive_posted() -> None:
    a, b = InProcessChannel.pair(ChannelSpec(64, 4, 64, 2), ChannelSpec(64, 4, 64, 2))
    for _ in range(2):
        a.send(a.send_buffer(0), 16)
    with pytest.raises(ApiError) as caught:
        a.send(a.send_buffer(0), 16)
    assert caught.value.code == "rdma_transfer_failed"
    b.repost(b.recv(1))
    a.send(a.send_buffer(0), 16)  # a reposted buffer is a credit again


def test_digest_mismatch_leaves_no_file(cache: ModelCache, model: Path, tmp_path: Path) -> None:
    other = write_tiny_gguf(tmp_path / "store" / "other.gguf", seed=8)
    outcome = transfer(cache, model, sha256=sha256_file(other))
    assert outcome.sender_error.status == 502
    assert outcome.sender_error.code == outcome.receiver_error.code == "digest_mismatch"
    assert cache_files(cache) == []


def test_file_changed_while_sending_is_a_digest_mismatch(cache: ModelCache, model: Path, tmp_path: Path) -> None:
    declared = sha256_file(model)
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: what the END digest is there to catch
    model.write_bytes(bytes(data))
    outcome = transfer(cache, model, sha256=declared)
    assert outcome.sender_error.code == "digest_mismatch"
    assert cache_files(cache) == []


def test_broken_off_transfer_leaves_no_file(cache: ModelCache, model: Path) -> None:
    outcome = transfer(cache, model, chunk=1000, break_after=40)
    assert outcome.sender_error.code == "rdma_transfer_failed"
    assert outcome.receiver_error.code == "rdma_transfer_failed"
    assert cache_files(cache) == []


def test_silent_sender_times_out_and_leaves_no_file(cache: ModelCache, model: Path) -> None:
    sender, receiver = InProcessChannel.pair(ChannelSpec.for_sender(4096, 2), ChannelSpec.for_receiver(4096, 2))
    errors: list[ApiError] = []

    def serve() -> None:
        try:
            receive_file(receiver, cache, timeout_s=0.3)
        except ApiError as err:
            errors.append(err)

    thread = threading.Thread(target=serve)
    thread.start()
    post(sender, Kind.OPEN, body={"name": "tiny.gguf", "size": model.stat().st_size, "sha256": sha256_file(model),
                                  "control_depth": CONTROL_DEPTH})  # OPEN, then nothing more: a stuck sender
    thread.join(5)
    assert errors and errors[0].code == "rdma_transfer_failed"
    assert cache_files(cache) == []


def test_shrinking_file_is_aborted_by_the_sender(cache: ModelCache, model: Path) -> None:
    outcome = transfer(cache, model, size=model.stat().st_size + 5000)
    assert outcome.sender_error.code == "rdma_transfer_failed"
    assert "shrank" in outcome.sender_error.message
    assert outcome.receiver_error.code == "rdma_transfer_failed"
    assert "sender aborted" in outcome.receiver_error.message and "shrank" in outcome.receiver_error.message
    assert cache_files(cache) == []


def test_a_sender_failing_mid_transfer_tells_the_receiver(cache: ModelCache, model: Path, monkeypatch) -> None:
    from model_swap.rdma import protocol

    reads = 0
    read_into = protocol._read_into

    def failing_read(f, view):
        nonlocal reads
        reads += 1
        if reads == 3:
            raise transfer_failed("the store's disk went away")
        return read_into(f, view)

    monkeypatch.setattr(protocol, "_read_into", failing_read)
    started = time.monotonic()
    outcome = transfer(cache, model, timeout_s=30)
    assert outcome.sender_error.code == outcome.receiver_error.code == "rdma_transfer_failed"
    assert outcome.receiver_error.message == "sender aborted: the store's disk went away"
    assert time.monotonic() - started < 10  # told at once, not left to its 30 s timeout
    assert cache_files(cache) == []


def test_credits_beyond_the_grant_fail_the_sender_which_aborts(model: Path) -> None:
    sender, receiver = InProcessChannel.pair(ChannelSpec.for_sender(4096, 4), ChannelSpec.for_receiver(4096, 4))
    # Queued before the sender starts, so it reads both at once: two credits granted, then one more
    # returned though nothing was sent. With more credits than posted receives, a SEND could meet
    # an empty receive queue: the sender must stop, not rely on RNR retries.
    post(receiver, Kind.READY, body={"credits": 2, "chunk": 4096})
    post(receiver, Kind.CREDIT, seq=1)
    with pytest.raises(ApiError) as caught:
        send_file(sender, "tiny.gguf", model, model.stat().st_size, sha256_file(model), timeout_s=TIMEOUT_S)
    assert caught.value.code == "rdma_transfer_failed"
    assert "more credits than it granted" in caught.value.message
    arrived = []
    while (buffer := receiver.recv(0)) is not None:
        arrived.append(parse(buffer))
    assert arrived[-1].kind is Kind.ABORT and Kind.DATA not in [m.kind for m in arrived]
    assert "more credits than it granted" in arrived[-1].body()["message"]


def test_empty_file_travels_but_is_refused_as_not_gguf(cache: ModelCache, tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    outcome = transfer(cache, empty, name="empty.gguf")
    assert outcome.sender_error.code == "not_gguf"
    assert outcome.sender.messages_sent == 2  # OPEN and END, no DATA
    assert cache_files(cache) == []


def test_file_smaller_than_one_chunk(cache: ModelCache, tmp_path: Path) -> None:
    small = tmp_path / "small.gguf"
    small.write_bytes(b"GGUF" + bytes(range(7)))
    outcome = transfer(cache, small, name="small.gguf", chunk=4096)
    assert outcome.sender_error is None
    assert outcome.report.chunks == 1
    assert (cache.root / "small.gguf").read_bytes() == small.read_bytes()


def test_too_large_model_is_refused_before_any_data(tmp_path: Path, model: Path) -> None:
    small_cache = ModelCache(tmp_path / "cache", max_model_bytes=1000, reserve_disk_bytes=0)
    outcome = transfer(small_cache, model)
    assert outcome.sender_error.code == "model_too_large"
    assert outcome.sender.messages_sent == 1  # OPEN only
    assert cache_files(small_cache) == []


@pytest.mark.parametrize("sender_token", [None, "wrong"])
def test_wrong_or_missing_token_is_refused(cache: ModelCache, model: Path, sender_token: str | None) -> None:
    outcome = transfer(cache, model, token="s3cret", sender_token=sender_token)
    assert outcome.sender_error.code == "unauthorized"
    assert outcome.sender.messages_sent == 1
    assert cache_files(cache) == []


def test_right_token_is_accepted(cache: ModelCache, model: Path) -> None:
    outcome = transfer(cache, model, token="s3cret", sender_token="s3cret")
    assert outcome.sender_error is None
    assert cache_files(cache) == ["tiny.gguf"]


def test_invalid_model_name_is_refused(cache: ModelCache, model: Path) -> None:
    outcome = transfer(cache, model, name="../escape.gguf")
    assert outcome.sender_error.code == "invalid_model_name"
    assert cache_files(cache) == []

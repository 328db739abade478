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
from model_swap.rdma.inprocess import InProcessChannel
from model_swap.rdma.protocol import CONTROL_DEPTH, HEADER, MAGIC, VERSION, ChannelSpec, Kind, receive_file, send_file

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
             receiver_chunk: int | None = None, size: int | None = None, sha256: str | None = None,
             break_after: int | None = None, token: str | None = None, sender_token: str | None = None,
             timeout_s: float = TIMEOUT_S) -> Outcome:
    """Run receive_file on a thread and send_file here, over a fresh loopback pair."""
    sender, receiver = InProcessChannel.pair(ChannelSpec.for_sender(chunk, depth),
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


@pytest.mark.parametrize("chunk", [1000, 4093, 65536, 1 << 20])
def test_real_gguf_lands_in_the_cache_byte_for_byte(cache: ModelCache, model: Path, chunk: int) -> None:
    size = model.stat().st_size
    assert chunk >= size or size % chunk, "want chunk sizes that leave a short last chunk"
    outcome = transfer(cache, model, chunk=chunk)
    assert outcome.sender_error is None and outcome.receiver_error is None
    assert (cache.root / "tiny.gguf").read_bytes() == model.read_bytes()
    assert outcome.receipt.sha256 == sha256_file(model) == outcome.report.sha256
    assert outcome.report.chunks == math.ceil(size / chunk)
    assert outcome.report.receiver["ok"] is True
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


def test_credits_limit_the_chunks_in_flight(cache: ModelCache, model: Path) -> None:
    depth = 3
    outcome = transfer(SlowSink(cache, 0.002), model, chunk=8192, depth=depth)
    assert outcome.sender_error is None and outcome.receiver_error is None
    # The loopback pair fails any SEND without a posted receive, as verbs would (RNR): that the
    # transfer finished means credits never let the sender overrun; the peak shows they were all used.
    assert outcome.receiver.peak_in_use == depth
    assert outcome.report.credit_waits > 0
    assert outcome.sender.peak_in_use <= CONTROL_DEPTH  # CREDIT messages never overrun the sender either
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
    body = json.dumps({"name": "tiny.gguf", "size": model.stat().st_size, "sha256": sha256_file(model),
                       "control_depth": CONTROL_DEPTH}).encode()
    buffer = sender.send_buffer(0)
    HEADER.pack_into(buffer.view, 0, MAGIC, VERSION, Kind.OPEN, 0, 0, len(body))
    buffer.view[HEADER.size:HEADER.size + len(body)] = body
    sender.send(buffer, HEADER.size + len(body))  # OPEN, then nothing more: a stuck sender
    thread.join(5)
    assert errors and errors[0].code == "rdma_transfer_failed"
    assert cache_files(cache) == []


def test_shrinking_file_is_aborted_by_the_sender(cache: ModelCache, model: Path) -> None:
    outcome = transfer(cache, model, size=model.stat().st_size + 5000)
    assert outcome.sender_error.code == "rdma_transfer_failed"
    assert "shrank" in outcome.sender_error.message
    assert outcome.receiver_error.code == "rdma_transfer_failed"
    assert cache_files(cache) == []


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

"""TextAssembler: whole characters only, stop strings held back and cut, as create_completion does."""

from __future__ import annotations

from inference_worker.batch_text import TextAssembler


def feed_all(assembler: TextAssembler, pieces: list[bytes]) -> list[str]:
    return [assembler.feed(p) for p in pieces]


def test_character_split_across_tokens_is_sent_whole():
    euro = "€".encode()  # three bytes
    a = TextAssembler()
    assert feed_all(a, [b"a" + euro[:1], euro[1:2], euro[2:] + b"b"]) == ["a", "", "€b"]
    assert a.finish() == ""


def test_stop_string_across_tokens_is_never_sent():
    a = TextAssembler(["END"])
    out = feed_all(a, [b"one E", b"N", b"D two"])
    assert out == ["one ", "", ""]
    assert a.stopped
    assert a.feed(b"more") == "" and a.finish() == ""


def test_held_text_is_released_when_it_is_not_a_stop():
    a = TextAssembler(["END"])
    assert feed_all(a, [b"E", b"N", b"x"]) == ["", "", "ENx"]
    assert not a.stopped


def test_earliest_of_several_stops_wins():
    a = TextAssembler(["zz", "b"])
    assert a.feed(b"a b zz") == "a "
    assert a.stopped


def test_finish_flushes_a_held_prefix():
    a = TextAssembler(["END"])
    assert a.feed(b"x EN") == "x "
    assert a.finish() == "EN"


def test_bytes_that_never_form_a_character_are_dropped():
    a = TextAssembler()
    assert a.feed(b"a\xff") == "a"
    assert a.feed(b"\xe2\x82") == ""
    assert a.finish() == ""

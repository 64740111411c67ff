"""The wire header: it round-trips, and any other bytes give ProtocolError, never a crash."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ringlib import ProtocolError, RingError
from ringlib.transport import PROTOCOL_VERSION, Header, Kind, frames
from ringlib.transport.frames import decode, encode

headers = st.builds(Header, st.sampled_from(Kind), st.integers(0, 2**63), st.integers(0, 2**31),
                    st.integers(0, 2**31), st.sampled_from(["float32", "bfloat16", ""]),
                    st.integers(0, 2**40), st.integers(0, 4096))


@given(headers)
def test_headers_round_trip(header):
    assert decode(encode(header)) == header


@given(st.binary(max_size=64))
def test_random_bytes_are_a_protocol_error_or_a_valid_header(data):
    try:
        header = decode(data)
    except ProtocolError:
        return
    assert decode(encode(header)) == header


@given(headers, st.integers(0, 40))
def test_truncated_headers_are_protocol_errors(header, cut):
    data = encode(header)
    if cut < len(data):
        with pytest.raises(ProtocolError):
            decode(data[:cut])


@pytest.mark.parametrize("fields, why", [
    ((PROTOCOL_VERSION + 1, 0, 1, 0, 0, "float32", 3, 0), "protocol version"),
    ((PROTOCOL_VERSION, 99, 1, 0, 0, "float32", 3, 0), "bad kind"),
    ((PROTOCOL_VERSION, 0, -1, 0, 0, "float32", 3, 0), "non-negative"),
    ((PROTOCOL_VERSION, 0, 1, 0, 0, 5, 3, 0), "sig"),
    ((PROTOCOL_VERSION, 0, 1, 0), "array"),
    ({"seq": 1}, "array"),
])
def test_foreign_headers_say_what_is_wrong(fields, why):
    with pytest.raises(ProtocolError, match=why) as caught:
        decode(msgpack.packb(fields))
    assert isinstance(caught.value, RingError)


ids = st.integers(0, 2**31)


@given(ids, ids, ids, ids)
def test_each_kind_is_made_and_waited_on_by_its_own_typed_pair_even_across_the_wire(a, b, c, r):
    made_and_awaited = [
        (frames.data(a, b, c, "all_reduce float32[4] sum", r, 16), frames.data_key(a, b, c, r)),
        (frames.stream(a, b, c, "uint8", r, 16), frames.stream_key(a, b, c, r)),
        (frames.reform(a, c, b, r), frames.reform_key(a, c, b, r)),
        *((frames.control(kind, r), frames.control_key(kind, r))
          for kind in (Kind.HELLO, Kind.JOIN, Kind.TABLE, Kind.LINK, Kind.BYE)),
    ]
    for header, key in made_and_awaited:
        assert decode(encode(header)).key == key
    # Two kinds never meet on one key, whatever their numbers.
    assert len({key for _, key in made_and_awaited}) == len(made_and_awaited)


@given(ids, ids)
def test_the_fields_of_control_messages_read_back_as_what_they_were_made_with(rank, sender):
    for closed in (False, True):
        assert frames.lost_rank(decode(encode(frames.lost(rank, sender, closed)))) == \
            (rank, closed)
    assert decode(encode(frames.mismatch(rank, sender))).seq == rank
    for step in frames.SharedStep:
        assert frames.shared_step(decode(encode(frames.shared_link(step, sender)))) == step

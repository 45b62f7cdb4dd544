"""The attachment file format (aegisd/core/attachment.py) and its descriptor payload (0x08):
Padmé, block sealing bound to index and count, seed derivations, the strict parser."""

from __future__ import annotations

import contextlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegisd.core import attachment as att
from aegisd.core import wire
from aegisd.core.errors import DecodeError, DecryptionError

SEED = bytes(range(32))


def descriptor(size: int = 40_000, name: str = "photo.jpg") -> wire.AttachmentPayload:
    return wire.AttachmentPayload(
        message_id=bytes(16), sent_at_ms=1_700_000_000_000, seed=SEED, size=size,
        blocks=wire.attachment_blocks(size), digest=bytes(range(32, 64)),
        relay_url="wss://relay.example/v1/ws", name=name,
    )  # fmt: skip


def reference_padme(n: int) -> int:
    """Padmé as the paper writes it (floating-point logs), for comparison."""
    if n <= 2:
        return n
    e = math.floor(math.log2(n))
    s = math.floor(math.log2(e)) + 1
    last = e - s
    mask = (1 << last) - 1
    return (n + mask) & ~mask


def test_padme_known_values_and_bounds() -> None:
    assert [wire.padme(n) for n in (1, 2, 3, 8, 9, 10, 11, 17, 100, 1282, 6110, 8192)] == [
        1, 2, 3, 8, 10, 10, 12, 18, 104, 1344, 6144, 8192,
    ]  # fmt: skip
    with pytest.raises(ValueError):
        wire.padme(0)
    for n in range(1, 9000):
        p = wire.padme(n)
        assert p == reference_padme(n)
        assert n <= p <= n * 1.12 + 1  # Padmé's overhead bound
        assert wire.padme(p) == p  # idempotent: a padded count is its own class
    # Far fewer size classes than counts: what the relay learns is coarse.
    assert len({wire.padme(n) for n in range(1, 8193)}) < 8192 / 10


def test_a_100_mb_file_fits_one_relay_quota() -> None:
    assert wire.attachment_blocks(100_000_000) <= wire.ATTACHMENT_MAX_BLOCKS
    assert wire.attachment_blocks(att.MAX_FILE_SIZE) == wire.ATTACHMENT_MAX_BLOCKS
    assert wire.attachment_blocks(att.MAX_FILE_SIZE + 1) > wire.ATTACHMENT_MAX_BLOCKS
    assert wire.attachment_blocks(0) == 1


def test_blocks_look_like_message_blocks_and_round_trip() -> None:
    keys = att.FileKeys(SEED)
    total = 5
    blocks = [keys.seal(i, total, bytes([i]) * (100 if i < 3 else 0)) for i in range(total)]
    for i, b in enumerate(blocks):
        assert len(b) == wire.BLOCK_SIZE and b[0] == wire.VERSION  # like a ratchet block
        wire.check_block(b)
        assert b[1:].count(0) < 200  # no visible zero padding: filler looks like data
        assert keys.open(i, total, b)[:100] == (bytes([i]) * 100 if i < 3 else bytes(100))
    assert len(set(blocks)) == total
    assert "SEED" not in repr(keys) and SEED.hex() not in repr(keys)


def test_blocks_are_bound_to_index_count_and_key() -> None:
    keys = att.FileKeys(SEED)
    block = keys.seal(2, 4, b"secret chunk")
    attempts = [
        (keys, 1, 4, block),  # moved to another position
        (keys, 2, 3, block),  # the file cut short
        (keys, 2, 5, block),  # the file lengthened
        (att.FileKeys(bytes(32)), 2, 4, block),  # another file's key
        (keys, 2, 4, block[:-1] + bytes([block[-1] ^ 1])),  # tampered tag
        (keys, 2, 4, block[:100] + bytes([block[100] ^ 1]) + block[101:]),  # tampered body
        (keys, 2, 4, bytes([2]) + block[1:]),  # another version
        (keys, 2, 4, block[:-1]),  # short
    ]
    for k, i, n, b in attempts:
        with pytest.raises(DecryptionError) as e:
            k.open(i, n, b)
        assert str(e.value) == "block could not be decrypted"  # one error for every cause


def test_seed_derivations_are_distinct_and_stable() -> None:
    a, b = att.FileKeys(SEED), att.FileKeys(bytes(32))
    ids = {a.blob_id(i) for i in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 16 for i in ids)
    assert a.blob_id(7) == att.FileKeys(SEED).blob_id(7)  # a resumed upload finds its ids
    assert a.blob_id(7) != b.blob_id(7) and a.capability(7) != b.capability(7)
    assert a.capability(1) != a.capability(2) and len(a.capability(1)) == 32
    with pytest.raises(ValueError):
        att.FileKeys(bytes(31))


def test_chunk_of_and_file_names() -> None:
    n = att.CHUNK_LEN
    assert att.chunk_of(2 * n + 5, 0) == (0, n)
    assert att.chunk_of(2 * n + 5, 2) == (2 * n, 5)
    assert att.chunk_of(2 * n + 5, 3) == (3 * n, 0)  # a filler block
    assert att.clean_file_name("../../etc/passwd") == "passwd"
    assert att.clean_file_name("C:\\Users\\x\\evil.exe") == "evil.exe"
    assert att.clean_file_name("..hidden") == "hidden"
    assert att.clean_file_name("a\u202egnp.exe") == "agnp.exe"  # no bidi override
    assert att.clean_file_name("") == "file" and att.clean_file_name("/") == "file"
    assert len(att.clean_file_name("é" * 300).encode()) <= wire.MAX_FILE_NAME_BYTES


def test_descriptor_round_trip_and_strictness() -> None:
    p = descriptor()
    data = wire.encode_payload(p)
    assert data[:2] == bytes((wire.VERSION, wire.PAYLOAD_ATTACHMENT)) and data[1] == 0x08
    assert wire.decode_payload(data) == p
    assert SEED.hex() not in repr(p)
    with pytest.raises(DecodeError):
        wire.decode_payload(data + b"\x00")
    for cut in range(2, len(data)):
        with pytest.raises(DecodeError):
            wire.decode_payload(data[:cut])
    # A block count that is not Padmé of the size is refused both ways.
    bad = wire.AttachmentPayload(**{**p.__dict__, "blocks": p.blocks + 1})
    with pytest.raises(ValueError):
        wire.encode_payload(bad)
    i = 2 + 16 + 8 + 32 + 8
    forged = data[:i] + (p.blocks + 1).to_bytes(4, "big") + data[i + 4 :]
    with pytest.raises(DecodeError):
        wire.decode_payload(forged)
    too_big = wire.AttachmentPayload(**{**p.__dict__, "size": att.MAX_FILE_SIZE + 1,
                                        "blocks": wire.attachment_blocks(att.MAX_FILE_SIZE + 1)})
    with pytest.raises(ValueError):
        wire.encode_payload(too_big)
    for empty in ({"name": ""}, {"relay_url": ""}):
        with pytest.raises(ValueError):
            wire.encode_payload(wire.AttachmentPayload(**{**p.__dict__, **empty}))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 400), st.integers(0, 255))
def test_descriptor_parser_fuzz(junk: bytes, pos: int, flip: int) -> None:
    """Random and mutated descriptors raise DecodeError or parse to a consistent payload."""
    data = wire.encode_payload(descriptor(size=pos * 1000))
    mutated = bytearray(data)
    mutated[pos % len(data)] ^= flip
    for candidate in (bytes(mutated), bytes((wire.VERSION, 0x08)) + junk, data[: pos % 80]):
        with contextlib.suppress(DecodeError):
            out = wire.decode_payload(candidate)
            if isinstance(out, wire.AttachmentPayload):
                assert out.blocks == wire.attachment_blocks(out.size)
                assert wire.encode_payload(out) == candidate

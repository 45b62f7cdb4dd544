"""Line framing with a size limit: any split into chunks gives the same lines."""

from __future__ import annotations

import asyncio
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from aegisd.rpc.server import read_lines

LIMIT = 16


def _reference(data: bytes, limit: int) -> list[bytes | None]:
    parts = data.split(b"\n")
    tail = parts.pop()  # after the last newline: a final line without newline, if any
    out: list[bytes | None] = [p if len(p) <= limit else None for p in parts]
    if tail:
        out.append(tail if len(tail) <= limit else None)
    return out


async def _run(chunks: list[bytes], limit: int) -> list[bytes | None]:
    reader = asyncio.StreamReader()
    for c in chunks:
        reader.feed_data(c)
    reader.feed_eof()
    return [line async for line in read_lines(reader, limit)]


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=8),
    final_newline=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
def test_chunking_does_not_change_the_lines(lines, final_newline, cuts):
    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in itertools.pairwise(points) if b > a]
    assert asyncio.run(_run(chunks, LIMIT)) == _reference(data, LIMIT)


def test_an_oversized_line_is_not_buffered():
    async def main() -> list[bytes | None]:
        reader = asyncio.StreamReader()
        reader.feed_data(b"x" * 100)  # over the limit, no newline yet
        it = read_lines(reader, 10)
        first = await it.__anext__()  # reported before the line ends
        reader.feed_data(b"y" * 100 + b"\nok\n")
        reader.feed_eof()
        return [first, *[x async for x in it]]

    assert asyncio.run(main()) == [None, b"ok"]

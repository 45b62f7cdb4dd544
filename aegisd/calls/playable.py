"""Whether a file can be sent in a call (``--play``), checked before the call starts.

aiortc's MediaPlayer opens the file only once the call connects: a file PyAV cannot read then
fails the call after the contact answered, and a file with no sound sends silence. This opens it
the way the player will and decodes its first frame. Imports PyAV (FFmpeg): called only when a
call is being started or answered with a file, which loads it anyway.
"""

from __future__ import annotations

MAX_PACKETS = 200  # a file whose first frame needs more than this many packets is not played


def probe(path: str, video: bool) -> str | None:
    """None if the file has sound (or, for a video call, pictures) PyAV can decode; else what is
    wrong, as the end of a sentence about "the file to play" (never the file's contents)."""
    import av

    try:
        container = av.open(path)
    except Exception:  # FFmpeg's InvalidDataError, OSError, ...: not media
        return "is not an audio or video file"
    try:
        streams = [s for s in container.streams if s.type == "audio"]
        if video and not streams:
            streams = [s for s in container.streams if s.type == "video"]
        if not streams:
            return "has no sound" + (" or pictures" if video else "")
        stream = streams[0]
        for n, packet in enumerate(container.demux(stream)):
            if n >= MAX_PACKETS:
                break
            try:
                if packet.decode():
                    return None
            except Exception:
                return "cannot be decoded"
        return "has no frame that can be decoded"
    except Exception:
        return "cannot be read as media"
    finally:
        container.close()

"""The MQTT packets the paho bridge reads and writes itself, without paho.

``decode_publish`` decodes a whole QoS 0/1 PUBLISH from a read buffer (paho builds a
message object, logs and matches per-filter callbacks for each: a third of the daemon's
CPU in a profile); ``encode_publish_qos0`` builds the QoS 0 PUBLISHes the bridge
coalesces into one write. Anything these do not handle is left to paho.
"""

from __future__ import annotations

import struct

__all__ = ["RawPublish", "decode_publish", "encode_publish_qos0", "remaining_length"]

# (topic, payload, mid, qos, dup, retain) of a PUBLISH, its topic still undecoded.
RawPublish = tuple[bytes, bytes, int, int, bool, bool]


def decode_publish(buf: bytes, pos: int, v5: bool) -> tuple[int, RawPublish] | None:
    """The packet at ``buf[pos:]``, if it is a whole QoS 0/1 PUBLISH, and where it ends.

    Returns (end, (topic, payload, mid, qos, dup, retain)); returns None for anything
    else (another packet type, QoS 2, v5 properties, no topic, a packet not wholly in
    ``buf`` yet, or a malformed one: paho reports those).
    """
    end = len(buf)
    if pos >= end:
        return None
    header = buf[pos]
    qos = (header >> 1) & 3
    if header >> 4 != 3 or qos > 1:
        return None
    # Remaining length: 1 to 4 bytes, 7 bits each, least significant first.
    length, shift, i = 0, 0, pos + 1
    while True:
        if i >= end or shift > 21:
            return None
        byte = buf[i]
        i += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    stop = i + length
    if stop > end or length < 2:
        return None
    topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
    if topic_end == i + 2:  # no topic: malformed on 3.1.1, a topic alias on v5
        return None
    body = topic_end + 2 if qos else topic_end
    if v5:
        if body >= stop or buf[body] != 0:  # properties present (or malformed)
            return None
        body += 1
    if body > stop:
        return None
    mid = (buf[topic_end] << 8) | buf[topic_end + 1] if qos else 0
    dup, retain = bool(header & 0x08), bool(header & 0x01)
    return stop, (buf[i + 2 : topic_end], buf[body:stop], mid, qos, dup, retain)


def encode_publish_qos0(topic: str, payload: bytes, retain: bool, v5: bool) -> bytes:
    """A complete QoS 0 PUBLISH packet."""
    name = topic.encode()
    body = struct.pack("!H", len(name)) + name + (b"\x00" if v5 else b"") + payload
    return bytes((0x30 | retain,)) + remaining_length(len(body)) + body


def remaining_length(length: int) -> bytes:
    """``length`` as MQTT's variable-length integer (the fixed header's remaining length)."""
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | 0x80 if length else byte)
        if not length:
            return bytes(out)

"""The decoder of each payload format, by the name a source's config gives it."""

from __future__ import annotations

from collections.abc import Callable

from agents.decoding import Decoder, DecoderContext, JsonDecoder, ValueDecoder
from agents.sparkplug.host import SparkplugHost

__all__ = ["DECODERS"]

DECODERS: dict[str, Callable[[DecoderContext], Decoder]] = {
    "json": JsonDecoder,
    "value": ValueDecoder,
    "sparkplug": SparkplugHost,
}

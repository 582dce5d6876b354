"""The plant-floor side: the domain every layer shares (readings, payload codecs, topics),
and the device simulator (``edge.simulator``, reached only from the command line)."""

from edge.codecs import decode_json, decode_value, encode_json, encode_value
from edge.errors import IngestdError
from edge.readings import DECODER_REASONS, PayloadError, Reading, format_ts, parse_ts
from edge.topics import TopicTemplate, topic_matches

__all__ = [
    "DECODER_REASONS",
    "IngestdError",
    "PayloadError",
    "Reading",
    "TopicTemplate",
    "decode_json",
    "decode_value",
    "encode_json",
    "encode_value",
    "format_ts",
    "parse_ts",
    "topic_matches",
]

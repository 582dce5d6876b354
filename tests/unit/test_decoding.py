"""Decoders by format (DECODERS), routes and the Router; the BoundedCache it keeps topics in."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub
from prometheus_client import CollectorRegistry

from agents.cache import BoundedCache
from agents.decoding import DecoderContext, JsonDecoder, ValueDecoder
from agents.formats import DECODERS
from agents.metrics import PipelineMetrics
from daemon.config import Format, SourceConfig
from edge.readings import BAD_TYPE, MALFORMED_JSON, PayloadError, Reading
from tests.unit.fakes import NOW, FakeOutbound, raw, routes

PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
CONTEXT = DecoderContext(
    outbound=FakeOutbound(), state_dir=Path("unused"), metrics=PipelineMetrics(CollectorRegistry())
)
FIELDS = {"device_id": "press-01", "sensor_id": "temp"}

ROUTER_SOURCES = (
    SourceConfig(),
    SourceConfig(topic="values/+/+", format="value", template="values/{device_id}/{sensor_id}"),
    SourceConfig(topic="plant/+/+/#", template="plant/{site}/{device_id}/#"),
)

topic_levels = st.one_of(
    st.sampled_from(["sensors", "values", "plant", "d1", "s1", "", "+", "#", "$SYS", "x"]),
    st.text(max_size=6),
)
topics = st.lists(topic_levels, min_size=0, max_size=7).map("/".join) | st.text(max_size=30)


# ------------------------------------------------------------------------------ decoders


def test_every_configurable_format_has_a_decoder() -> None:
    assert set(DECODERS) == set(typing.get_args(Format))


def test_json_decoder_reads_the_payload_with_the_topic_fields_and_receipt_time() -> None:
    decoder = DECODERS["json"](CONTEXT)
    assert isinstance(decoder, JsonDecoder)
    readings = decoder.decode(raw(0, payload=b'{"value": 21.5, "unit": "degC"}'), FIELDS)
    assert readings == [
        Reading(device_id="press-01", sensor_id="temp", ts=NOW, value=21.5, unit="degC")
    ]
    with pytest.raises(PayloadError) as info:
        decoder.decode(raw(1, payload=b"{"), FIELDS)
    assert info.value.reason == MALFORMED_JSON


def test_value_decoder_reads_a_bare_number_stamped_with_receipt_time() -> None:
    decoder = DECODERS["value"](CONTEXT)
    assert isinstance(decoder, ValueDecoder)
    assert decoder.decode(raw(0, payload=b"1450"), FIELDS) == [
        Reading(device_id="press-01", sensor_id="temp", ts=NOW, value=1450.0)
    ]
    with pytest.raises(PayloadError) as info:
        decoder.decode(raw(1, payload=b'{"value": 1}'), FIELDS)
    assert info.value.reason == BAD_TYPE


# ------------------------------------------------------------------------------ routing


def test_router_first_match_wins_and_unknown_is_none() -> None:
    router = routes(
        *ROUTER_SOURCES, SourceConfig(topic="sensors/#", template="sensors/{device_id}/#")
    )

    def answer(topic: str) -> tuple[str, type, dict[str, str]] | None:
        found = router.route(topic)
        if found is None:
            return None
        route, fields = found
        return route.topic_filter, type(route.decoder), fields

    assert answer("sensors/d1/s1") == (
        "sensors/+/+", JsonDecoder, {"device_id": "d1", "sensor_id": "s1"},
    )  # fmt: skip
    assert answer("sensors/d1/s1/x") == ("sensors/#", JsonDecoder, {"device_id": "d1"})
    assert answer("values/d1/s1") == (
        "values/+/+", ValueDecoder, {"device_id": "d1", "sensor_id": "s1"},
    )  # fmt: skip
    assert answer("plant/b/d/s") == ("plant/+/+/#", JsonDecoder, {"site": "b", "device_id": "d"})
    assert answer("nowhere/d1/s1") is None
    assert answer("sensors//s1") is None  # an empty level never fills a field


@given(topics)
@PROPERTY_SETTINGS
def test_router_never_raises_on_arbitrary_topics(topic: str) -> None:
    router = routes(*ROUTER_SOURCES)
    found = router.route(topic)
    assert router.route(topic) == found  # cached answer is the same
    if found is None:
        return
    route, fields = found
    assert route.topic_filter in {source.topic for source in ROUTER_SOURCES}
    assert topic_matches_sub(route.topic_filter, topic)  # paho as an independent oracle
    for value in fields.values():
        assert value
        assert "/" not in value


def test_router_answers_the_same_after_its_cache_is_cleared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("agents.decoding._TOPIC_CACHE_LIMIT", 2)
    router = routes(*ROUTER_SOURCES)
    first = router.route("sensors/d1/s1")
    assert first is not None
    for n in range(5):  # more unique topics than the cache holds
        router.route(f"sensors/d{n}/x")
    again = router.route("sensors/d1/s1")
    assert again is not None
    assert again[0] is first[0]
    assert again[1] == {"device_id": "d1", "sensor_id": "s1"}


# ------------------------------------------------------------------------------ BoundedCache


def test_bounded_cache_keeps_entries_below_its_limit() -> None:
    cache: BoundedCache[str, int] = BoundedCache(3)
    assert cache.put("a", 1) == 1  # put returns the value, for `return cache.put(...)`
    cache.put("b", 2)
    cache.put("c", 3)
    assert cache == {"a": 1, "b": 2, "c": 3}


def test_bounded_cache_clears_whole_at_its_limit() -> None:
    cache: BoundedCache[str, int] = BoundedCache(3)
    for n, key in enumerate("abc"):
        cache.put(key, n)
    assert cache.put("d", 9) == 9
    assert cache == {"d": 9}  # full: cleared, then the new entry kept


def test_bounded_cache_never_grows_past_its_limit() -> None:
    cache: BoundedCache[int, int] = BoundedCache(100)
    sizes = set()
    for n in range(1_000):  # a flood of unique keys
        cache.put(n, n)
        sizes.add(len(cache))
    assert max(sizes) == 100
    assert cache[999] == 999

"""Publisher: DataProcessed and DataProcessingFailed events on MQTT, after the commit."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable

import pytest

from agents.bus import Bus
from agents.events import ReadingsStored, RejectedMessage, RejectionsStored
from agents.metrics import EVENT_KINDS, PipelineMetrics
from agents.publisher import EventSettings, Publisher, topic_segment
from agents.reasons import UNKNOWN_TOPIC
from edge.readings import MALFORMED_JSON
from tests.unit.fakes import FakeOutbound, raw, row, sample


def publisher(
    bus: Bus,
    metrics: PipelineMetrics,
    outbound: FakeOutbound,
    *,
    prefix: str = "ingestd",
    processed: bool = True,
    release: Callable[[Iterable[int]], None] = lambda _done: None,
) -> Publisher:
    inbox = bus.inbox("publisher", 10, ReadingsStored, RejectionsStored)
    settings = EventSettings(
        prefix=prefix, processed=processed, processed_qos=0, failed_qos=1, max_payload_bytes=8
    )
    return Publisher(bus, metrics, inbox, outbound, settings, release)


def test_every_event_kind_series_starts_at_zero(metrics: PipelineMetrics) -> None:
    assert set(EVENT_KINDS) == {"processed", "failed", "alert", "maintenance"}
    for kind in EVENT_KINDS:
        assert sample(metrics, "ingestd_events_published_total", {"kind": kind}) == 0
        assert sample(metrics, "ingestd_events_dropped_total", {"kind": kind}) == 0


async def test_publisher_processed_event(bus: Bus, metrics: PipelineMetrics) -> None:
    outbound = FakeOutbound()
    message = raw(3)
    stored = row(
        "press-01", "temp", 21.5, message=message, unit="degC", quality="good", seq=9,
        site="berlin", sensor_type="pt100",
    )  # fmt: skip
    await publisher(bus, metrics, outbound).handle([ReadingsStored([stored])])
    ((topic, body, qos),) = outbound.sent
    assert topic == "ingestd/processed/press-01/temp"
    assert qos == 0
    assert outbound.retained == [False]
    assert body["ts"] == "2026-11-27T07:30:00.123456Z"
    assert body["received_at"] == "2026-11-27T07:30:00.123456Z"
    assert body["event_id"]
    assert body["correlation_id"] == "corr-3"
    assert {k: body[k] for k in ("device_id", "sensor_id", "value", "unit", "quality", "seq")} == {
        "device_id": "press-01", "sensor_id": "temp", "value": 21.5, "unit": "degC",
        "quality": "good", "seq": 9,
    }  # fmt: skip
    assert (body["site"], body["sensor_type"], body["area"]) == ("berlin", "pt100", None)
    assert sample(metrics, "ingestd_events_published_total", {"kind": "processed"}) == 1


async def test_publisher_event_ids_are_unique(bus: Bus, metrics: PipelineMetrics) -> None:
    outbound = FakeOutbound()
    agent = publisher(bus, metrics, outbound)
    event = ReadingsStored([row(second=n, message=raw(n)) for n in range(5)])
    await agent.handle([event, RejectionsStored([RejectedMessage(raw(9), "bad_type", "x")])])
    ids = [body["event_id"] for _, body, _ in outbound.sent]
    assert len(ids) == 6
    assert len(set(ids)) == 6


async def test_publisher_failed_event(bus: Bus, metrics: PipelineMetrics) -> None:
    outbound = FakeOutbound()
    message = raw(5, "sensors/d1/s1", b"0123456789abcdef")
    rejection = RejectedMessage(message, MALFORMED_JSON, "malformed JSON: x", "d1")
    await publisher(bus, metrics, outbound).handle([RejectionsStored([rejection])])
    ((topic, body, qos),) = outbound.sent
    assert topic == "ingestd/failed/d1"
    assert qos == 1
    assert body["reason"] == "malformed_json"
    assert body["error"] == "malformed JSON: x"
    assert body["topic"] == "sensors/d1/s1"
    assert body["correlation_id"] == "corr-5"
    assert body["device_id"] == "d1"
    assert base64.b64decode(body["payload"]) == b"01234567"  # the stored, truncated copy
    assert body["payload_size"] == 16
    assert body["received_at"] == "2026-11-27T07:30:00.123456Z"
    assert sample(metrics, "ingestd_events_published_total", {"kind": "failed"}) == 1


async def test_publisher_failed_without_device_goes_to_unknown(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    outbound = FakeOutbound()
    rejection = RejectedMessage(raw(0, "nowhere", b"\xff\x00"), UNKNOWN_TOPIC, "no source")
    await publisher(bus, metrics, outbound, prefix="site7/ingest").handle(
        [RejectionsStored([rejection])]
    )
    ((topic, body, _),) = outbound.sent
    assert topic == "site7/ingest/failed/_unknown"
    assert body["device_id"] is None
    assert base64.b64decode(body["payload"]) == b"\xff\x00"


async def test_publisher_counts_dropped_events(bus: Bus, metrics: PipelineMetrics) -> None:
    outbound = FakeOutbound(result=False)
    agent = publisher(bus, metrics, outbound)
    await agent.handle(
        [
            ReadingsStored([row(second=1, message=raw(1)), row(second=2, message=raw(2))]),
            RejectionsStored([RejectedMessage(raw(3), "bad_type", "x", "d1")]),
        ]
    )
    assert len(outbound.sent) == 3
    assert sample(metrics, "ingestd_events_dropped_total", {"kind": "processed"}) == 2
    assert sample(metrics, "ingestd_events_dropped_total", {"kind": "failed"}) == 1
    assert sample(metrics, "ingestd_events_published_total", {"kind": "processed"}) == 0


async def test_publisher_processed_disabled_still_publishes_failures(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    outbound = FakeOutbound()
    await publisher(bus, metrics, outbound, processed=False).handle(
        [ReadingsStored([row()]), RejectionsStored([RejectedMessage(raw(1), "x", "y")])]
    )
    assert [topic for topic, _, _ in outbound.sent] == ["ingestd/failed/_unknown"]


async def test_publisher_sanitises_topic_segments(bus: Bus, metrics: PipelineMetrics) -> None:
    outbound = FakeOutbound()
    await publisher(bus, metrics, outbound).handle(
        [
            ReadingsStored([row("a/b+c#d", "x/#")]),
            RejectionsStored([RejectedMessage(raw(1), "x", "y", "dev/+/#")]),
        ]
    )
    assert [topic for topic, _, _ in outbound.sent] == [
        "ingestd/processed/a_b_c_d/x__", "ingestd/failed/dev____",
    ]  # fmt: skip
    assert outbound.sent[0][1]["device_id"] == "a/b+c#d"  # the body keeps the real id


async def test_publisher_reconfigure_applies_from_the_next_event(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    outbound = FakeOutbound()
    agent = publisher(bus, metrics, outbound)
    await agent.handle([ReadingsStored([row()])])
    agent.reconfigure(EventSettings(prefix="plant9", processed_qos=1))
    await agent.handle([ReadingsStored([row()])])  # the same sensor: no stale cached topic
    agent.reconfigure(EventSettings(processed=False))
    await agent.handle([ReadingsStored([row()])])
    assert [(topic, qos) for topic, _, qos in outbound.sent] == [
        ("ingestd/processed/d1/s1", 0), ("plant9/processed/d1/s1", 1),
    ]  # fmt: skip


async def test_publisher_does_not_treat_an_unknown_event_as_a_failure(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    outbound = FakeOutbound()
    agent = publisher(bus, metrics, outbound)
    unknown = RejectedMessage(raw(1), "bad_type", "x", "d1")  # not wrapped in RejectionsStored
    with pytest.raises(AssertionError):  # the exhaustive match: a wiring mistake is a crash
        await agent.handle([unknown])  # type: ignore[list-item]
    assert outbound.sent == []
    assert sample(metrics, "ingestd_events_published_total", {"kind": "failed"}) == 0
    assert sample(metrics, "ingestd_events_dropped_total", {"kind": "failed"}) == 0


@pytest.mark.parametrize(
    ("text", "segment"),
    [(None, "_unknown"), ("", "_unknown"), ("ok-1", "ok-1"), ("a\x00b", "a_b"), ("+", "_")],
)
def test_topic_segment(text: str | None, segment: str) -> None:
    assert topic_segment(text) == segment


# ------------------------------------------------------------------------ the in-flight budget


class Releases:
    """The release callback: what was released, and how many events were sent by then."""

    def __init__(self, outbound: FakeOutbound) -> None:
        self.outbound = outbound
        self.calls: list[tuple[tuple[int, ...], int]] = []

    def __call__(self, done: Iterable[int]) -> None:
        self.calls.append((tuple(done), len(self.outbound.sent)))


@pytest.mark.parametrize("processed", [True, False])
@pytest.mark.parametrize("accepted", [True, False])
async def test_publisher_releases_done_messages_after_handling_their_event(
    bus: Bus, metrics: PipelineMetrics, processed: bool, accepted: bool
) -> None:
    outbound = FakeOutbound(result=accepted)  # dropped events release as well
    released = Releases(outbound)
    agent = publisher(bus, metrics, outbound, processed=processed, release=released)
    rejection = RejectedMessage(raw(2), "bad_type", "x", "d1")
    await agent.handle(
        [
            RejectionsStored([rejection]),
            ReadingsStored([row(second=1, message=raw(0)), row(second=2, message=raw(1))],
                           done=(0, 1, 2)),
            ReadingsStored([], done=(3,)),  # nothing new to announce, but done
            ReadingsStored([row(second=5, message=raw(5))]),  # a spool replay: no message
        ]
    )  # fmt: skip
    if processed:
        # Released once its events were handed over: the failed one, then two processed.
        assert released.calls == [((0, 1, 2), 3), ((3,), 3), ((), 4)]
    else:
        assert released.calls == [((0, 1, 2), 1), ((3,), 1), ((), 1)]
    assert len(outbound.sent) == (4 if processed else 1)


async def test_publisher_releases_nothing_for_rejections_alone(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    outbound = FakeOutbound()
    released = Releases(outbound)
    agent = publisher(bus, metrics, outbound, release=released)
    await agent.handle([RejectionsStored([RejectedMessage(raw(2), "bad_type", "x", "d1")])])
    assert len(outbound.sent) == 1
    assert released.calls == []  # the batch's ReadingsStored, which follows, releases it

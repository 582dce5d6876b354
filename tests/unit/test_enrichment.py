"""EnrichmentAgent (registry metadata and quality, as rows to store) and the device registry
it reads (agents/registry.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from agents.bus import Bus
from agents.enrichment import EnrichmentAgent
from agents.events import EnrichedMessage, RejectedMessage, ValidatedMessage
from agents.metrics import PipelineMetrics
from agents.reasons import INTERNAL_ERROR
from agents.registry import DeviceInfo, DeviceRegistry, RegistryError, load_registry_file
from db.rows import ReadingRow
from edge.readings import Reading
from tests.unit.fakes import NOW, drain, raw, reading

REGISTRY_ROWS = [
    {"device_id": "d1", "sensor_id": "*", "site": "berlin", "area": "hall-2", "line": "L1",
     "asset": "press-01", "unit": "degC", "min_value": 0, "max_value": 100},
    {"device_id": "d1", "sensor_id": "temp", "sensor_type": "pt100", "max_value": 80},
    {"device_id": "d1", "sensor_id": "pressure", "unit": "bar", "min_value": "1.5"},
    {"device_id": "d2", "sensor_id": "rpm", "sensor_type": "encoder", "unit": "1/min"},
]  # fmt: skip


# ------------------------------------------------------------------------------ enrichment


async def enrich(bus: Bus, metrics: PipelineMetrics, *readings: Reading) -> list[ReadingRow]:
    agent = EnrichmentAgent(
        bus, metrics, bus.inbox("enrichment", 10, ValidatedMessage), DeviceRegistry(REGISTRY_ROWS)
    )
    out = bus.inbox("persistence", 10, EnrichedMessage, RejectedMessage)
    message = raw(0)
    await agent.handle([ValidatedMessage(message, list(readings))])
    (result,) = drain(out)
    assert type(result) is EnrichedMessage
    assert result.message is message
    return result.rows


async def test_enrichment_fills_registry_metadata(bus: Bus, metrics: PipelineMetrics) -> None:
    (r,) = await enrich(bus, metrics, reading("d1", "temp", 50.0))
    assert (r.site, r.area, r.line, r.asset, r.sensor_type, r.unit, r.quality) == (
        "berlin", "hall-2", "L1", "press-01", "pt100", "degC", "good",
    )  # fmt: skip


async def test_enrichment_makes_the_row_to_store(bus: Bus, metrics: PipelineMetrics) -> None:
    (r,) = await enrich(bus, metrics, reading("d1", "temp", 50.0, second=7, seq=3))
    assert type(r) is ReadingRow
    assert (r.device_id, r.sensor_id, r.ts, r.value, r.seq) == (
        "d1", "temp", NOW.replace(second=7), 50.0, 3,
    )  # fmt: skip
    message = raw(0)  # the message the reading came in, as enrich() sends it
    assert (r.received_at, r.correlation_id) == (message.received_at, message.correlation_id)


async def test_enrichment_out_of_range_uses_the_sensor_override(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    rows = await enrich(
        bus, metrics,
        reading("d1", "temp", 80.0), reading("d1", "temp", 80.5),  # sensor max 80
        reading("d1", "other", 90.0), reading("d1", "other", 100.5),  # device max 100
        reading("d1", "other", -0.1), reading("d1", "pressure", 1.0),  # min 0, sensor min 1.5
    )  # fmt: skip
    assert [r.quality for r in rows] == [
        "good", "out_of_range", "good", "out_of_range", "out_of_range", "out_of_range",
    ]  # fmt: skip


async def test_enrichment_payload_values_win_over_registry(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    (r,) = await enrich(bus, metrics, reading("d1", "temp", 20.0, unit="degF", site="topic-site"))
    assert r.unit == "degF"
    assert r.site == "topic-site"
    assert r.area == "hall-2"


async def test_enrichment_device_quality_kept_unless_out_of_range(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    in_range, out_of_range = await enrich(
        bus, metrics,
        reading("d1", "temp", 20.0, quality="uncertain"),
        reading("d1", "temp", 99.0, quality="good"),
    )  # fmt: skip
    assert in_range.quality == "uncertain"
    assert out_of_range.quality == "out_of_range"


async def test_enrichment_unknown_device_gets_good_quality_only(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    (r,) = await enrich(bus, metrics, reading("unknown", "x", 1e9))
    assert r.quality == "good"
    assert (r.site, r.unit, r.sensor_type) == (None, None, None)


async def test_enrichment_recover_rejects_as_internal_error(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    agent = EnrichmentAgent(
        bus, metrics, bus.inbox("enrichment", 10, ValidatedMessage), DeviceRegistry()
    )
    out = bus.inbox("persistence", 10, EnrichedMessage, RejectedMessage)
    await agent.recover([ValidatedMessage(raw(4), [reading()])])
    (result,) = drain(out)
    assert (type(result), result.reason, result.message.seq) == (RejectedMessage, INTERNAL_ERROR, 4)


# ------------------------------------------------------------------------------ registry


def test_registry_merges_device_defaults_under_sensor_rows() -> None:
    registry = DeviceRegistry(REGISTRY_ROWS)
    assert len(registry) == 2
    assert registry.lookup("d1", "temp") == DeviceInfo(
        site="berlin", area="hall-2", line="L1", asset="press-01", sensor_type="pt100",
        unit="degC", min_value=0.0, max_value=80.0,
    )  # fmt: skip
    assert registry.lookup("d1", "pressure") == DeviceInfo(
        site="berlin", area="hall-2", line="L1", asset="press-01", unit="bar",
        min_value=1.5, max_value=100.0,
    )  # fmt: skip
    # A sensor with no row of its own gets the device defaults.
    assert registry.lookup("d1", "other") == DeviceInfo(
        site="berlin", area="hall-2", line="L1", asset="press-01", unit="degC",
        min_value=0.0, max_value=100.0,
    )  # fmt: skip
    # A sensor row without device defaults stands alone.
    assert registry.lookup("d2", "rpm") == DeviceInfo(sensor_type="encoder", unit="1/min")
    assert registry.lookup("d2", "other") is None
    assert registry.lookup("nope", "temp") is None


def test_registry_later_rows_override_and_invalidate_the_cache() -> None:
    registry = DeviceRegistry([{"device_id": "d1", "site": "a"}])
    assert registry.lookup("d1", "x") == DeviceInfo(site="a")
    registry.add([{"device_id": "d1", "sensor_id": "", "site": "b"}])  # "" means "*"
    assert registry.lookup("d1", "x") == DeviceInfo(site="b")


def test_registry_ignores_updated_at_and_empty_values() -> None:
    registry = DeviceRegistry(
        [{"device_id": "d1", "sensor_id": "s", "updated_at": NOW, "site": "", "min_value": None}]
    )
    assert registry.lookup("d1", "s") == DeviceInfo()


@pytest.mark.parametrize(
    ("row", "message"),
    [({"device_id": "d1", "colour": "red"}, "unknown registry fields ['colour']"),
     ({"device_id": "d1", "min_value": "low"}, "min_value must be a number"),
     ({"device_id": "d1", "max_value": "nan"}, "max_value must be finite"),
     ({"device_id": "d1", "max_value": float("inf")}, "max_value must be finite")],
)  # fmt: skip
def test_registry_row_errors(row: dict[str, Any], message: str) -> None:
    with pytest.raises(RegistryError, match=re.escape(message)):
        DeviceRegistry([row])


def test_load_registry_toml(tmp_path: Path) -> None:
    path = tmp_path / "devices.toml"
    path.write_text(
        """
[[devices]]
device_id = "d1"
site = "berlin"
min = -10
max = 100.5

[devices.sensors.temp]
sensor_type = "pt100"
max = 80

[devices.sensors.vib]
unit = "mm/s"

[[devices]]
device_id = "d2"
line = "L2"
""",
        encoding="utf-8",
    )
    rows = load_registry_file(path)
    assert rows == [
        {
            "device_id": "d1",
            "sensor_id": "*",
            "site": "berlin",
            "min_value": -10,
            "max_value": 100.5,
        },
        {"device_id": "d1", "sensor_id": "temp", "sensor_type": "pt100", "max_value": 80},
        {"device_id": "d1", "sensor_id": "vib", "unit": "mm/s"},
        {"device_id": "d2", "sensor_id": "*", "line": "L2"},
    ]
    registry = DeviceRegistry(rows)
    assert registry.lookup("d1", "temp") == DeviceInfo(
        site="berlin", sensor_type="pt100", min_value=-10.0, max_value=80.0
    )
    assert registry.lookup("d2", "any") == DeviceInfo(line="L2")


def test_load_registry_csv(tmp_path: Path) -> None:
    path = tmp_path / "devices.CSV"  # the suffix is case-insensitive
    path.write_text(
        "device_id,sensor_id,site,unit,min_value,max_value\n"
        "d1,*,berlin,degC,0,100\n"
        "d1,temp,,,,80\n"
        "d3,,munich,,,\n",
        encoding="utf-8",
    )
    rows = load_registry_file(path)
    assert len(rows) == 3
    registry = DeviceRegistry(rows)
    assert registry.lookup("d1", "temp") == DeviceInfo(
        site="berlin", unit="degC", min_value=0.0, max_value=80.0
    )
    assert registry.lookup("d3", "x") == DeviceInfo(site="munich")


def test_load_registry_empty_toml(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("", encoding="utf-8")
    assert load_registry_file(path) == []


@pytest.mark.parametrize(
    ("name", "content"),
    [("bad.toml", b"[[devices]\ndevice_id = "),
     ("nodevice.toml", b'[[devices]]\nsite = "x"\n'),
     ("latin1.toml", b'[[devices]]\ndevice_id = "caf\xe9"\n'),
     ("latin1.csv", b"device_id\ncaf\xe9\n")],
)  # fmt: skip
def test_load_registry_errors_name_the_file(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RegistryError, match=re.escape(name)):
        load_registry_file(path)


def test_load_registry_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"missing\.toml"):
        load_registry_file(tmp_path / "missing.toml")


def test_csv_with_unknown_column_fails_when_added(tmp_path: Path) -> None:
    path = tmp_path / "devices.csv"
    path.write_text("device_id,sensor_id,colour\nd1,s1,red\n", encoding="utf-8")
    with pytest.raises(RegistryError, match="colour"):
        DeviceRegistry(load_registry_file(path))


@pytest.mark.parametrize(
    ("name", "content"),
    [("list.toml", '[[devices]]\ndevice_id = "d1"\nsensors = ["temp"]\n'),
     ("scalar.toml", '[[devices]]\ndevice_id = "d1"\n[devices.sensors]\ntemp = 5\n'),
     ("number.toml", "devices = 5\n"),
     ("extra.csv", "device_id,sensor_id,colour\nd1,s1,red,extra\n"),
     ("nodevice.csv", "device,site\nd1,berlin\n")],
)  # fmt: skip
def test_structurally_wrong_registry_files_raise_registry_error(
    tmp_path: Path, name: str, content: str
) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RegistryError):
        DeviceRegistry(load_registry_file(path))


def test_csv_with_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfdevice_id,sensor_id,site\r\nd1,*,berlin\r\n")
    registry = DeviceRegistry(load_registry_file(path))
    assert registry.lookup("d1", "temp") == DeviceInfo(site="berlin")

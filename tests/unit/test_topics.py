"""edge.topics: TopicTemplate parsing and matching, and topic_matches against paho's matcher."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from edge.topics import TEMPLATE_FIELDS, TopicTemplate, topic_matches

PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

# ------------------------------------------------------------------------------ templates


def test_template_parse_and_match() -> None:
    template = TopicTemplate.parse("sensors/{device_id}/{sensor_id}", "sensors/+/+")
    assert template.match("sensors/d1/s1") == {"device_id": "d1", "sensor_id": "s1"}
    assert template.match("sensors/d1") is None
    assert template.match("sensors/d1/s1/extra") is None
    assert template.match("other/d1/s1") is None
    assert template.match("sensors//s1") is None


def test_template_with_any_literals_and_open_end() -> None:
    template = TopicTemplate.parse("plant/{site}/+/{device_id}/{sensor_id}/#", "plant/+/+/+/+/#")
    assert template.open_ended
    assert template.match("plant/berlin/x/d1/s1") == {
        "site": "berlin", "device_id": "d1", "sensor_id": "s1",
    }  # fmt: skip
    assert template.match("plant/berlin/x/d1/s1/raw/more") == {
        "site": "berlin", "device_id": "d1", "sensor_id": "s1",
    }  # fmt: skip
    assert template.match("plant/berlin/x/d1") is None
    # '+' in the template ignores the level but it must still be present (may be empty).
    assert template.match("plant/berlin//d1/s1") == {
        "site": "berlin", "device_id": "d1", "sensor_id": "s1",
    }  # fmt: skip


def test_template_filter_may_fix_levels_the_template_names() -> None:
    template = TopicTemplate.parse("sensors/{device_id}/{sensor_id}", "sensors/press-01/+")
    assert template.match("sensors/press-01/t") == {"device_id": "press-01", "sensor_id": "t"}


@pytest.mark.parametrize(
    ("template", "topic_filter", "message"),
    [("sensors/{device}/{sensor_id}", None, "not one of"),
     ("sensors/{device_id}/{device_id}", None, "twice"),
     ("sensors/a+b/{sensor_id}", None, "neither a literal"),
     ("sensors/#/{sensor_id}", None, "neither a literal"),
     ("sensors/{device_id/{sensor_id}", None, "neither a literal"),
     ("sensors/x}/{sensor_id}", None, "neither a literal"),
     ("sensors/{device_id}/{sensor_id}", "sensors/+", "levels"),
     ("sensors/{device_id}/{sensor_id}", "sensors/+/+/+", "levels"),
     ("sensors/{device_id}/{sensor_id}", "sensors/#", "needs a template ending in '#'"),
     ("sensors/{device_id}/{sensor_id}", "other/+/+", "does not match filter level"),
     ("sensors/{device_id}/{sensor_id}", "sensors/+/a#", "not a valid MQTT filter"),
     ("sensors/{device_id}/{sensor_id}", "sensors/x+/+", "not a valid MQTT filter"),
     ("sensors/{device_id}/{sensor_id}", "", "not a valid MQTT filter"),
     ("sensors/{device_id}/#", "sensors/#/+", "must be the last level")],
)  # fmt: skip
def test_template_parse_errors(template: str, topic_filter: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TopicTemplate.parse(template, topic_filter)


@pytest.mark.parametrize("name", sorted(TEMPLATE_FIELDS))
def test_every_template_field_is_accepted(name: str) -> None:
    assert TopicTemplate.parse(f"x/{{{name}}}").match("x/v") == {name: "v"}


topic_levels = st.one_of(
    st.sampled_from(["sensors", "values", "plant", "d1", "s1", "", "+", "#", "$SYS", "x"]),
    st.text(max_size=6),
)
topics = st.lists(topic_levels, min_size=0, max_size=7).map("/".join) | st.text(max_size=30)


@given(topics)
@PROPERTY_SETTINGS
def test_template_match_rebuilds_the_topic(topic: str) -> None:
    template = TopicTemplate.parse("sensors/{device_id}/+/{sensor_id}")
    fields = template.match(topic)
    if fields is None:
        return
    levels = topic.split("/")
    assert levels[0] == "sensors"
    assert fields == {"device_id": levels[1], "sensor_id": levels[3]}
    assert all(fields.values())
    assert len(levels) == 4


# ------------------------------------------------------------------------------ topic_matches


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [("sensors/+/+", "sensors/d1/s1", True),
     ("sensors/+/+", "sensors/d1", False),
     ("sensors/+/+", "sensors/d1/s1/x", False),
     ("sensors/#", "sensors", True),  # '#' also matches the parent level
     ("sensors/#", "sensors/a/b/c", True),
     ("sensors/#", "sensorsx", False),
     ("#", "anything/at/all", True),
     ("#", "$SYS/broker/load", False),  # wildcards at the first level skip '$' topics
     ("+/broker/load", "$SYS/broker/load", False),
     ("$SYS/#", "$SYS/broker/load", True),
     ("$SYS/+/load", "$SYS/broker/load", True),
     ("a/+/c", "a//c", True),  # an empty level is a level
     ("+", "", True),
     ("+/+", "/", True),
     ("a/+", "a", False),
     ("a//b", "a//b", True),
     ("a//b", "a/b", False),
     ("A/b", "a/b", False)],
)  # fmt: skip
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


FILTERS = (
    "#", "+", "+/+", "+/#", "/#", "/+", "a", "a/", "a/#", "a/+", "a/+/#", "a/+/c", "a/b/c",
    "a//c", "+/b/#", "+/+/+", "a/b/#", "$SYS", "$SYS/#", "$SYS/+", "$SYS/+/c", "$share/g/a/+",
    "sensors/+/+", "sensors/#", "",
)  # fmt: skip
TOPICS = (
    "", "/", "//", "a", "a/", "a//", "a/b", "a/b/", "a/b/c", "a//c", "a/b/c/d", "b", "b/b/c",
    "/a", "/a/b", "$SYS", "$SYS/", "$SYS/b", "$SYS/b/c", "$SYS/broker/load", "$share/g/a/x",
    "$other", "sensors", "sensors/d1/s1", "sensors//s1", "A/b/c",
)  # fmt: skip


def test_topic_matches_agrees_with_paho_on_a_grid() -> None:
    disagreements = [
        (topic_filter, topic)
        for topic_filter, topic in itertools.product(FILTERS, TOPICS)
        if topic_matches(topic_filter, topic) != topic_matches_sub(topic_filter, topic)
    ]
    assert disagreements == []
    # The grid is not trivially one-sided.
    outcomes = {topic_matches(f, t) for f, t in itertools.product(FILTERS, TOPICS)}
    assert outcomes == {True, False}


filter_levels = st.sampled_from(["a", "b", "", "$SYS", "x y", "é", "+"])
valid_filters = st.builds(
    lambda levels, tail: "/".join([*levels, "#"] if tail else levels) or "#",
    st.lists(filter_levels, min_size=0, max_size=5),
    st.booleans(),
)
plain_topics = st.lists(
    st.sampled_from(["a", "b", "", "$SYS", "x y", "é", "$x"]), min_size=1, max_size=6
).map("/".join)


@given(valid_filters, plain_topics)
@PROPERTY_SETTINGS
def test_topic_matches_agrees_with_paho(topic_filter: str, topic: str) -> None:
    assert topic_matches(topic_filter, topic) == topic_matches_sub(topic_filter, topic)


@given(plain_topics)
@PROPERTY_SETTINGS
def test_a_topic_matches_itself_as_a_filter(topic: str) -> None:
    assert topic_matches(topic, topic)
    assert topic_matches("#", topic) is not topic.startswith("$")

"""Topic templates: named topic segments become reading fields (Telegraf-style topic parsing)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TEMPLATE_FIELDS", "TopicTemplate", "topic_matches", "topic_segment"]

# Fields a topic segment may fill; anything else in braces is a configuration error.
TEMPLATE_FIELDS = frozenset({"device_id", "sensor_id", "site", "area", "line", "asset", "unit"})


@dataclass(frozen=True, slots=True)
class TopicTemplate:
    """A parsed template such as ``sensors/{device_id}/{sensor_id}``.

    Each segment is a field name, ``None`` for an ignored ``+``, or a literal; a final
    ``#`` matches any remaining levels.
    """

    segments: tuple[tuple[str, str | None], ...]  # (kind, text): kind is "field", "any" or "lit"
    open_ended: bool

    @classmethod
    def parse(cls, template: str, topic_filter: str | None = None) -> TopicTemplate:
        parts = template.split("/")
        open_ended = parts[-1] == "#"
        if open_ended:
            parts = parts[:-1]
        segments: list[tuple[str, str | None]] = []
        seen: set[str] = set()
        for part in parts:
            if part.startswith("{") and part.endswith("}"):
                name = part[1:-1]
                if name not in TEMPLATE_FIELDS:
                    allowed = ", ".join(sorted(TEMPLATE_FIELDS))
                    raise ValueError(f"template field {{{name}}} is not one of: {allowed}")
                if name in seen:
                    raise ValueError(f"template names {{{name}}} twice")
                seen.add(name)
                segments.append(("field", name))
            elif part == "+":
                segments.append(("any", None))
            elif "#" in part or "+" in part or "{" in part or "}" in part:
                raise ValueError(f"template segment {part!r} is neither a literal nor {{field}}")
            else:
                segments.append(("lit", part))
        parsed = cls(tuple(segments), open_ended)
        if topic_filter is not None:
            parsed._check_filter(topic_filter)
        return parsed

    def _check_filter(self, topic_filter: str) -> None:
        parts = topic_filter.split("/")
        if not topic_filter or any(
            ("#" in p and p != "#") or ("+" in p and p != "+") for p in parts
        ):
            raise ValueError(f"topic filter {topic_filter!r} is not a valid MQTT filter")
        if "#" in parts[:-1]:
            raise ValueError(f"topic filter {topic_filter!r}: '#' must be the last level")
        filter_open = parts[-1] == "#"
        if filter_open:
            parts = parts[:-1]
        if filter_open and not self.open_ended:
            raise ValueError("a filter ending in '#' needs a template ending in '#'")
        if len(parts) != len(self.segments) and not self.open_ended:
            raise ValueError(
                f"template has {len(self.segments)} levels, "
                f"filter {topic_filter!r} has {len(parts)}"
            )
        for part, (kind, text) in zip(parts, self.segments, strict=False):
            if kind == "lit" and part not in {"+", text}:
                raise ValueError(f"template literal {text!r} does not match filter level {part!r}")

    def match(self, topic: str) -> dict[str, str] | None:
        """The named fields of ``topic``, or None when the topic does not fit the template."""
        levels = topic.split("/")
        if len(levels) < len(self.segments) or (
            len(levels) != len(self.segments) and not self.open_ended
        ):
            return None
        fields: dict[str, str] = {}
        for level, (kind, text) in zip(levels, self.segments, strict=False):
            if kind == "field":
                if not level:
                    return None
                fields[text] = level  # type: ignore[index]
            elif kind == "lit" and level != text:
                return None
        return fields


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches the MQTT filter (``+`` one level, ``#`` the rest).

    As MQTT 3.1.1 section 4.7 says, including that wildcards at the first level do not
    match topics starting with ``$`` (``$SYS``, ``$share``).
    """
    if topic.startswith("$") and topic_filter[:1] in {"+", "#"}:
        return False
    levels = topic.split("/")
    parts = topic_filter.split("/")
    for index, part in enumerate(parts):
        if part == "#":
            return True  # also matches the parent level: "a/#" matches "a"
        if index >= len(levels) or (part != "+" and part != levels[index]):
            return False
    return len(parts) == len(levels)


_TOPIC_UNSAFE = str.maketrans({"/": "_", "+": "_", "#": "_", "\x00": "_"})


def topic_segment(text: str | None) -> str:
    """A value safe as one topic level (no separators or wildcards)."""
    return text.translate(_TOPIC_UNSAFE) if text else "_unknown"

"""SQLAlchemy models: the schema both PostgreSQL/TimescaleDB and SQLite get from Alembic."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite has no 64-bit autoincrement for BIGINT primary keys; INTEGER is its rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "pk": "pk_%(table_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        }
    )


class SensorReading(Base):
    """One stored measurement; the key (device_id, sensor_id, ts) makes redeliveries harmless."""

    __tablename__ = "sensor_readings"

    # The primary key doubles as the unique key and includes the time column, which
    # TimescaleDB requires of every unique index on a hypertable.
    device_id: Mapped[str] = mapped_column(Text, primary_key=True)
    sensor_id: Mapped[str] = mapped_column(Text, primary_key=True)
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    # value is NULL exactly when value_text holds a non-numeric value (migration 0003).
    value: Mapped[float | None] = mapped_column(Float(precision=53))
    unit: Mapped[str | None] = mapped_column(Text)
    quality: Mapped[str | None] = mapped_column(Text)
    seq: Mapped[int | None] = mapped_column(BigInteger)
    site: Mapped[str | None] = mapped_column(Text)
    area: Mapped[str | None] = mapped_column(Text)
    line: Mapped[str | None] = mapped_column(Text)
    asset: Mapped[str | None] = mapped_column(Text)
    sensor_type: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    correlation_id: Mapped[str] = mapped_column(Text)
    value_text: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint("(value IS NULL) <> (value_text IS NULL)", name="value_or_text"),
        Index(None, "ts"),
    )


class RejectedMessage(Base):
    """A dead letter: the message as received, with a stable reason code and a readable error."""

    __tablename__ = "rejected_messages"
    __table_args__ = (
        Index(None, "topic", "payload_sha256"),
        Index(None, "received_at"),
        Index(None, "correlation_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    topic: Mapped[str] = mapped_column(Text)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    # Lets a redelivered (DUP) rejection be recognised instead of stored twice.
    payload_sha256: Mapped[str] = mapped_column(String(64))
    payload_size: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    error: Mapped[str] = mapped_column(Text)
    device_id: Mapped[str | None] = mapped_column(Text)
    correlation_id: Mapped[str] = mapped_column(Text)


class Device(Base):
    """Registry rows for enrichment; ``sensor_id = '*'`` holds a device's defaults."""

    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(Text, primary_key=True)
    sensor_id: Mapped[str] = mapped_column(Text, primary_key=True, default="*")
    site: Mapped[str | None] = mapped_column(Text)
    area: Mapped[str | None] = mapped_column(Text)
    line: Mapped[str | None] = mapped_column(Text)
    asset: Mapped[str | None] = mapped_column(Text)
    sensor_type: Mapped[str | None] = mapped_column(Text)
    unit: Mapped[str | None] = mapped_column(Text)
    min_value: Mapped[float | None] = mapped_column(Float(precision=53))
    max_value: Mapped[float | None] = mapped_column(Float(precision=53))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class AnomalyAlert(Base):
    """One alert episode of a series and kind: opened at a reading's ts, closed at a later
    reading's (migration 0004). The natural key makes writing it idempotent; the partial
    unique index keeps at most one alert open per series and kind."""

    __tablename__ = "anomaly_alerts"
    __table_args__ = (
        UniqueConstraint("device_id", "sensor_id", "kind", "ts"),
        Index(
            "ux_anomaly_alerts_open",
            "device_id",
            "sensor_id",
            "kind",
            unique=True,
            postgresql_where=text("closed_at IS NULL"),
            sqlite_where=text("closed_at IS NULL"),
        ),
        Index(None, "task_id"),
        Index(None, "ts"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    device_id: Mapped[str] = mapped_column(Text)
    sensor_id: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)
    value: Mapped[float | None] = mapped_column(Float(precision=53))
    score: Mapped[float] = mapped_column(Float(precision=53))
    detail: Mapped[str] = mapped_column(Text)
    correlation_id: Mapped[str | None] = mapped_column(Text)
    unit: Mapped[str | None] = mapped_column(Text)
    site: Mapped[str | None] = mapped_column(Text)
    area: Mapped[str | None] = mapped_column(Text)
    line: Mapped[str | None] = mapped_column(Text)
    asset: Mapped[str | None] = mapped_column(Text)
    sensor_type: Mapped[str | None] = mapped_column(Text)
    # The maintenance task this alert fed.
    task_id: Mapped[int | None] = mapped_column(
        BigId, ForeignKey("maintenance_tasks.id", ondelete="SET NULL")
    )
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class MaintenanceTask(Base):
    """Work for a maintenance team: one open task per subject (asset, else device) and kind,
    fed by the alerts that attach to it (migration 0004)."""

    __tablename__ = "maintenance_tasks"
    __table_args__ = (
        CheckConstraint("status IN ('open', 'acknowledged', 'closed')", name="status"),
        CheckConstraint("priority IN ('low', 'medium', 'high')", name="priority"),
        Index(
            "ux_maintenance_tasks_open",
            "subject",
            "kind",
            unique=True,
            postgresql_where=text("status <> 'closed'"),
            sqlite_where=text("status <> 'closed'"),
        ),
        Index(None, "status", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    subject: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)
    device_id: Mapped[str] = mapped_column(Text)
    sensor_id: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    priority: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text)
    alert_count: Mapped[int] = mapped_column(Integer, server_default="1")
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_alert_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    acknowledged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    site: Mapped[str | None] = mapped_column(Text)
    area: Mapped[str | None] = mapped_column(Text)
    line: Mapped[str | None] = mapped_column(Text)
    asset: Mapped[str | None] = mapped_column(Text)

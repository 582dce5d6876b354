"""Initial schema: readings, dead letters, device registry, alerts, maintenance tasks.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
F8 = sa.Float(precision=53)
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "sensor_readings",
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("sensor_id", sa.Text(), nullable=False),
        sa.Column("ts", TS, nullable=False),
        sa.Column("value", F8, nullable=False),
        sa.Column("unit", sa.Text()),
        sa.Column("quality", sa.Text()),
        sa.Column("seq", sa.BigInteger()),
        sa.Column("site", sa.Text()),
        sa.Column("area", sa.Text()),
        sa.Column("line", sa.Text()),
        sa.Column("asset", sa.Text()),
        sa.Column("sensor_type", sa.Text()),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("correlation_id", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "sensor_id", "ts", name="pk_sensor_readings"),
    )
    op.create_index("ix_sensor_readings_ts", "sensor_readings", ["ts"])
    op.create_table(
        "rejected_messages",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("payload_sha256", sa.String(64), nullable=False),
        sa.Column("payload_size", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("device_id", sa.Text()),
        sa.Column("correlation_id", sa.Text(), nullable=False),
    )
    op.create_index(
        "ix_rejected_messages_topic_payload_sha256", "rejected_messages", ["topic", "payload_sha256"]
    )
    op.create_index("ix_rejected_messages_received_at", "rejected_messages", ["received_at"])
    op.create_table(
        "devices",
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("sensor_id", sa.Text(), nullable=False, server_default="*"),
        sa.Column("site", sa.Text()),
        sa.Column("area", sa.Text()),
        sa.Column("line", sa.Text()),
        sa.Column("asset", sa.Text()),
        sa.Column("sensor_type", sa.Text()),
        sa.Column("unit", sa.Text()),
        sa.Column("min_value", F8),
        sa.Column("max_value", F8),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("device_id", "sensor_id", name="pk_devices"),
    )
    op.create_table(
        "anomaly_alerts",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("ts", TS, nullable=False),
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("sensor_id", sa.Text(), nullable=False),
        sa.Column("value", F8, nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("score", F8),
        sa.Column("detail", sa.Text()),
        sa.Column("correlation_id", sa.Text()),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.create_index(
        "ix_anomaly_alerts_device_id_sensor_id_ts", "anomaly_alerts", ["device_id", "sensor_id", "ts"]
    )
    op.create_table(
        "maintenance_tasks",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("sensor_id", sa.Text()),
        sa.Column("alert_id", BIGID),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("priority", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
    )
    if op.get_bind().dialect.name == "postgresql":
        _hypertable_if_available()


def _hypertable_if_available() -> None:
    """Make sensor_readings a hypertable when TimescaleDB is installed; a plain table otherwise."""
    bind = op.get_bind()
    available = bind.execute(
        sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
    ).scalar()
    if not available:
        return
    # CREATE EXTENSION fails without superuser rights or shared_preload_libraries: keep the
    # plain table then, inside a savepoint so the rest of the migration still commits.
    savepoint = bind.begin_nested()
    try:
        bind.execute(sa.text("CREATE EXTENSION IF NOT EXISTS timescaledb"))
        bind.execute(
            sa.text(
                "SELECT create_hypertable('sensor_readings', 'ts', "
                "if_not_exists => TRUE, migrate_data => TRUE, create_default_indexes => FALSE)"
            )
        )
        savepoint.commit()
    except sa.exc.DBAPIError:
        savepoint.rollback()


def downgrade() -> None:
    for table in ("maintenance_tasks", "anomaly_alerts", "devices", "rejected_messages"):
        op.drop_table(table)
    op.drop_table("sensor_readings")

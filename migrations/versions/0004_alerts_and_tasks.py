"""anomaly_alerts and maintenance_tasks take their working shape: one row per alert episode
(opened at a reading's ts, closed_at filled by its closing) and one open task per subject
and kind, each with the partial unique index that makes writing them idempotent.

Both tables were created unused by 0001 and are empty in practice: they are recreated
rather than altered (SQLite would copy them anyway).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
F8 = sa.Float(precision=53)
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_OPEN_ALERT = sa.text("closed_at IS NULL")
_OPEN_TASK = sa.text("status <> 'closed'")


def _where(clause: sa.TextClause) -> dict[str, sa.TextClause]:
    return {"postgresql_where": clause, "sqlite_where": clause}


def _enrichment() -> list[sa.Column[str]]:
    return [sa.Column(name, sa.Text()) for name in ("site", "area", "line", "asset")]


def _stamps() -> list[sa.Column[object]]:
    return [
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
    ]


def upgrade() -> None:
    op.drop_table("maintenance_tasks")
    op.drop_table("anomaly_alerts")
    op.create_table(
        "maintenance_tasks",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("sensor_id", sa.Text()),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("priority", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("alert_count", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("opened_at", TS, nullable=False),
        sa.Column("last_alert_at", TS, nullable=False),
        *_stamps(),
        sa.Column("acknowledged_at", TS),
        sa.Column("closed_at", TS),
        *_enrichment(),
        sa.CheckConstraint(
            "status IN ('open', 'acknowledged', 'closed')", name=op.f("ck_maintenance_tasks_status")
        ),
        sa.CheckConstraint(
            "priority IN ('low', 'medium', 'high')", name=op.f("ck_maintenance_tasks_priority")
        ),
    )
    op.create_index(
        "ux_maintenance_tasks_open", "maintenance_tasks", ["subject", "kind"], unique=True,
        **_where(_OPEN_TASK),
    )
    op.create_index("ix_maintenance_tasks_status_id", "maintenance_tasks", ["status", "id"])
    op.create_table(
        "anomaly_alerts",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("ts", TS, nullable=False),
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("sensor_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("value", F8),
        sa.Column("score", F8, nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("correlation_id", sa.Text()),
        sa.Column("unit", sa.Text()),
        *_enrichment(),
        sa.Column("sensor_type", sa.Text()),
        sa.Column("task_id", BIGID),
        sa.Column("closed_at", TS),
        *_stamps(),
        sa.UniqueConstraint(
            "device_id", "sensor_id", "kind", "ts",
            name=op.f("uq_anomaly_alerts_device_id_sensor_id_kind_ts"),
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["maintenance_tasks.id"], ondelete="SET NULL",
            name=op.f("fk_anomaly_alerts_task_id_maintenance_tasks"),
        ),
    )
    op.create_index(
        "ux_anomaly_alerts_open", "anomaly_alerts", ["device_id", "sensor_id", "kind"],
        unique=True, **_where(_OPEN_ALERT),
    )
    op.create_index("ix_anomaly_alerts_task_id", "anomaly_alerts", ["task_id"])
    op.create_index("ix_anomaly_alerts_ts", "anomaly_alerts", ["ts"])


def downgrade() -> None:
    # Back to the shapes of 0001 (the rows do not fit them: they go).
    op.drop_table("anomaly_alerts")
    op.drop_table("maintenance_tasks")
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

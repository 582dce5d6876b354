"""sensor_readings.value_text for non-numeric values (Sparkplug strings, arrays, DataSets,
Templates); value becomes nullable, NULL exactly when value_text is set.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ONE_OF = "(value IS NULL) <> (value_text IS NULL)"


def upgrade() -> None:
    # batch mode: SQLite cannot alter a column in place (Alembic copies the table there;
    # on PostgreSQL these are plain ALTER TABLE statements).
    with op.batch_alter_table("sensor_readings") as table:
        table.add_column(sa.Column("value_text", sa.Text(), nullable=True))
        table.alter_column("value", existing_type=sa.Float(precision=53), nullable=True)
        table.create_check_constraint(op.f("ck_sensor_readings_value_or_text"), _ONE_OF)


def downgrade() -> None:
    op.execute("DELETE FROM sensor_readings WHERE value IS NULL")
    with op.batch_alter_table("sensor_readings") as table:
        table.drop_constraint(op.f("ck_sensor_readings_value_or_text"), type_="check")
        table.alter_column("value", existing_type=sa.Float(precision=53), nullable=False)
        table.drop_column("value_text")

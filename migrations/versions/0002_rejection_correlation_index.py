"""Index rejected_messages.correlation_id: replaying the spool checks it to store a dead letter once.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_rejected_messages_correlation_id", "rejected_messages", ["correlation_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_rejected_messages_correlation_id", "rejected_messages")

"""Admin tokens: `tokens.is_admin` (false for every token that existed before).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

An admin token (`lorapool token create --admin`) may also read /metrics and every tenant's
jobs; existing tokens stay tenant tokens (server default false).
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("is_admin", sa.Boolean(), server_default=sa.false(),
                                      nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.drop_column("is_admin")

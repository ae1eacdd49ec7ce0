"""dicomweb: what studies are searched by, the instances medbatch produced

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("dicom_studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("accession_number", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("study_date", sa.String(length=8), nullable=True))
    op.create_table(
        "dicom_outputs",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("study_id", _ID, nullable=False),
        sa.Column("result_id", _ID, nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("series_number", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["result_id"], ["dicom_results.id"]),
        sa.ForeignKeyConstraint(["study_id"], ["dicom_studies.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_instance_uid"),
    )
    with op.batch_alter_table("dicom_outputs", schema=None) as batch_op:
        batch_op.create_index("ix_dicom_outputs_study_series", ["study_id", "series_uid"])


def downgrade() -> None:
    with op.batch_alter_table("dicom_outputs", schema=None) as batch_op:
        batch_op.drop_index("ix_dicom_outputs_study_series")
    op.drop_table("dicom_outputs")
    with op.batch_alter_table("dicom_studies", schema=None) as batch_op:
        batch_op.drop_column("study_date")
        batch_op.drop_column("accession_number")

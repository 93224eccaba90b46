"""Alembic revision files (Alembic loads them by path; this file makes them ship as a package)."""

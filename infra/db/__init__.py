"""Database: migrations, the idempotent sink and stream-computed rollups."""

-- The outbox (streams/outbox.py): alerts and dead letters are published after
-- their batch commits, with a lease so no lock is held while the broker is
-- awaited. Dead letters stored before this migration were published by the
-- batch that stored them, hence the one-off default for existing rows.

ALTER TABLE alerts ADD COLUMN IF NOT EXISTS claimed_until timestamptz;

ALTER TABLE deadletters ADD COLUMN IF NOT EXISTS published_at timestamptz DEFAULT now();
ALTER TABLE deadletters ALTER COLUMN published_at DROP DEFAULT;
ALTER TABLE deadletters ADD COLUMN IF NOT EXISTS claimed_until timestamptz;
CREATE INDEX IF NOT EXISTS deadletters_unpublished ON deadletters (ts) WHERE published_at IS NULL;

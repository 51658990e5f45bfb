-- Market events, alerts, dead letters and stream-computed rollups.
-- Every statement is idempotent; the runner also records the version.
-- Unique keys include the time column so they can be hypertable keys.

CREATE TABLE IF NOT EXISTS sales (
    event_id   text        NOT NULL,
    ts         timestamptz NOT NULL,
    collection text        NOT NULL,
    item_id    text        NOT NULL,
    buyer      text        NOT NULL,
    seller     text        NOT NULL,
    price      numeric     NOT NULL CHECK (price >= 0),
    currency   text        NOT NULL,
    tx         text,
    synthetic  boolean     NOT NULL,
    source     text        NOT NULL,
    stored_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, ts)
);
CREATE INDEX IF NOT EXISTS sales_collection_ts ON sales (collection, ts DESC);

CREATE TABLE IF NOT EXISTS listings (
    event_id    text        NOT NULL,
    ts          timestamptz NOT NULL,
    marketplace text        NOT NULL,
    collection  text        NOT NULL,
    item_id     text        NOT NULL,
    seller      text        NOT NULL,
    price       numeric     NOT NULL CHECK (price >= 0),
    currency    text        NOT NULL,
    image_ref   text,
    synthetic   boolean     NOT NULL,
    source      text        NOT NULL,
    stored_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, ts)
);
CREATE INDEX IF NOT EXISTS listings_collection_ts ON listings (collection, ts DESC);

CREATE TABLE IF NOT EXISTS bids (
    event_id   text        NOT NULL,
    ts         timestamptz NOT NULL,
    auction_id text        NOT NULL,
    item_id    text        NOT NULL,
    collection text        NOT NULL,
    bidder     text        NOT NULL,
    amount     numeric     NOT NULL CHECK (amount >= 0),
    currency   text        NOT NULL,
    synthetic  boolean     NOT NULL,
    source     text        NOT NULL,
    stored_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, ts)
);
CREATE INDEX IF NOT EXISTS bids_auction_ts ON bids (auction_id, ts DESC);

CREATE TABLE IF NOT EXISTS images (
    event_id     text        NOT NULL,
    ts           timestamptz NOT NULL,
    item_id      text        NOT NULL,
    collection   text        NOT NULL,
    content_type text        NOT NULL,
    sha256       text        NOT NULL,
    data         bytea,
    uri          text,
    synthetic    boolean     NOT NULL,
    source       text        NOT NULL,
    stored_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, ts)
);

CREATE TABLE IF NOT EXISTS alerts (
    alert_id       text        NOT NULL,
    ts             timestamptz NOT NULL,
    kind           text        NOT NULL,
    severity       text        NOT NULL,
    subject        text        NOT NULL,
    collection     text        NOT NULL,
    evidence       jsonb       NOT NULL,
    model_versions jsonb       NOT NULL DEFAULT '{}',
    synthetic      boolean     NOT NULL,
    stored_at      timestamptz NOT NULL DEFAULT now(),
    -- Outbox: set once the alert is on the alerts topic; NULL rows are re-sent at start.
    published_at   timestamptz,
    PRIMARY KEY (alert_id, ts)
);
CREATE INDEX IF NOT EXISTS alerts_unpublished ON alerts (ts) WHERE published_at IS NULL;

-- Low volume and keyed by source position, so an ordinary table (never a hypertable).
CREATE TABLE IF NOT EXISTS deadletters (
    topic       text        NOT NULL,
    "partition" integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    ts          timestamptz NOT NULL,
    reason      text        NOT NULL,
    error       text        NOT NULL,
    key         bytea,
    value       bytea,
    PRIMARY KEY (topic, "partition", "offset")
);

-- Rollups per collection, event kind and currency, written by the stream from
-- newly inserted rows only (so a replayed batch adds nothing).
CREATE TABLE IF NOT EXISTS rollup_1m (
    bucket     timestamptz NOT NULL,
    collection text        NOT NULL,
    kind       text        NOT NULL,
    currency   text        NOT NULL,
    n          bigint      NOT NULL,
    n_synthetic bigint     NOT NULL,
    volume     numeric     NOT NULL,
    min_price  numeric     NOT NULL,
    max_price  numeric     NOT NULL,
    PRIMARY KEY (collection, kind, currency, bucket)
);

CREATE TABLE IF NOT EXISTS rollup_1h (LIKE rollup_1m INCLUDING ALL);

-- One identity per event, and rollups that keep real and synthetic apart (issue 8).
-- Re-runnable: every step leaves a migrated database as it is.

-- 1. Identity. Event tables are keyed (event_id, ts) because a hypertable's
-- unique keys must hold its time column, so on its own that key lets an event
-- re-sent with another ts in twice. event_ids is an ordinary table (never a
-- hypertable) holding each id once with the ts it was stored with; the sink
-- inserts into it in the batch's transaction and stores only events whose id
-- is new there (a version of a known id is compared with the stored row,
-- read back by (event_id, ts): infra/db/sink.py). kind is the event table's
-- name, or 'alerts' for alert ids.
--
-- Partitioned by kind, each kind's partition keyed by event_id alone: every
-- stored event costs one more insert here, and a key of (kind, event_id) made
-- that insert ~0.4 us slower per id than event_id alone (a server-side COPY of
-- 400k ids: 1.53 vs 1.15 us each, BENCHMARKS.md 2026-11-30). The parent still
-- answers for all kinds (WHERE kind = ..., TRUNCATE, INSERT routed by kind);
-- a kind without a partition of its own lands in event_ids_other, keyed
-- (kind, event_id). Giving such a kind a partition later means moving its
-- rows out of event_ids_other first (PostgreSQL refuses the new partition
-- otherwise). COLLATE "C": the key is compared bytewise (what equality means
-- anyway), so each insert skips locale comparisons (~0.15 us per id).
CREATE TABLE IF NOT EXISTS event_ids (
    kind     text COLLATE "C" NOT NULL,
    event_id text COLLATE "C" NOT NULL,
    ts       timestamptz      NOT NULL
) PARTITION BY LIST (kind);
CREATE TABLE IF NOT EXISTS event_ids_sales PARTITION OF event_ids (PRIMARY KEY (event_id)) FOR VALUES IN ('sales');
CREATE TABLE IF NOT EXISTS event_ids_listings PARTITION OF event_ids (PRIMARY KEY (event_id))
    FOR VALUES IN ('listings');
CREATE TABLE IF NOT EXISTS event_ids_bids PARTITION OF event_ids (PRIMARY KEY (event_id)) FOR VALUES IN ('bids');
CREATE TABLE IF NOT EXISTS event_ids_images PARTITION OF event_ids (PRIMARY KEY (event_id))
    FOR VALUES IN ('images');
CREATE TABLE IF NOT EXISTS event_ids_alerts PARTITION OF event_ids (PRIMARY KEY (event_id))
    FOR VALUES IN ('alerts');
CREATE TABLE IF NOT EXISTS event_ids_other PARTITION OF event_ids (PRIMARY KEY (kind, event_id)) DEFAULT;

-- 2. Existing databases: an id stored more than once (the old key allowed it)
-- keeps its first stored version (earliest stored_at, then ts); the others
-- move to deadletters (reason conflicting_duplicate, partition -1 = found by
-- this migration, value = the row as JSON) and out of the table, so the
-- backfill below and the rollups rebuilt in step 3 count each event once.
-- Then every stored id is backfilled.
DO $$
DECLARE
    t text;
    moved bigint;
BEGIN
    FOREACH t IN ARRAY ARRAY['sales', 'listings', 'bids', 'images'] LOOP
        EXECUTE format($q$
            WITH later AS (
                SELECT event_id, ts FROM (
                    SELECT event_id, ts, row_number() OVER (PARTITION BY event_id ORDER BY stored_at, ts) AS k
                    FROM %1$I) r
                WHERE k > 1),
            gone AS (
                DELETE FROM %1$I e USING later l WHERE e.event_id = l.event_id AND e.ts = l.ts RETURNING e.*)
            INSERT INTO deadletters (topic, "partition", "offset", ts, reason, error, key, value)
            SELECT %1$L, -1, -row_number() OVER (ORDER BY g.event_id, g.ts), now(), 'conflicting_duplicate',
                   format('event_id %%s was stored more than once before migration 002; this version (ts %%s)'
                          ' was removed, the first stored one is kept', g.event_id, g.ts),
                   convert_to(g.event_id, 'UTF8'), convert_to(row_to_json(g)::text, 'UTF8')
            FROM gone g
            ON CONFLICT DO NOTHING
        $q$, t);
        GET DIAGNOSTICS moved = ROW_COUNT;
        IF moved > 0 THEN
            RAISE NOTICE '%: % repeated version(s) of stored events moved to deadletters', t, moved;
        END IF;
        EXECUTE format(
            'INSERT INTO event_ids (kind, event_id, ts) SELECT %L, event_id, ts FROM %I ON CONFLICT DO NOTHING', t, t);
    END LOOP;

    -- Alerts: the same alert id twice (from an event stored twice) keeps the first.
    WITH later AS (
        SELECT alert_id, ts FROM (
            SELECT alert_id, ts, row_number() OVER (PARTITION BY alert_id ORDER BY stored_at, ts) AS k FROM alerts) r
        WHERE k > 1)
    DELETE FROM alerts a USING later l WHERE a.alert_id = l.alert_id AND a.ts = l.ts;
    GET DIAGNOSTICS moved = ROW_COUNT;
    IF moved > 0 THEN
        RAISE NOTICE 'alerts: % repeated alert id(s) removed', moved;
    END IF;
    INSERT INTO event_ids (kind, event_id, ts) SELECT 'alerts', alert_id, ts FROM alerts ON CONFLICT DO NOTHING;
END $$;

-- Alert ids are unique by themselves too, whatever inserts them: the alerts
-- table's key must hold ts (hypertable), so a trigger claims the id in
-- event_ids and skips an alert whose id is stored already (any ts). The
-- search_path is fixed at creation, so the trigger finds this schema's
-- event_ids whatever the session's path.
CREATE OR REPLACE FUNCTION alerts_one_per_id() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO event_ids (kind, event_id, ts) VALUES ('alerts', NEW.alert_id, NEW.ts) ON CONFLICT DO NOTHING;
    IF FOUND THEN
        RETURN NEW;
    END IF;
    RETURN NULL;  -- stored already: the first alert of an id wins
END $$;
DROP TRIGGER IF EXISTS alerts_one_per_id ON alerts;
CREATE TRIGGER alerts_one_per_id BEFORE INSERT ON alerts FOR EACH ROW EXECUTE FUNCTION alerts_one_per_id();

-- 3. Rollups keyed by synthetic too. Rebuilt from the event tables (the only
-- way to split existing volume, min and max); unique keys still hold bucket,
-- and infra/db/migrate.py makes both hypertables again right after.
DROP TABLE IF EXISTS rollup_1h;
DROP TABLE IF EXISTS rollup_1m;
CREATE TABLE rollup_1m (
    bucket      timestamptz NOT NULL,
    collection  text        NOT NULL,
    kind        text        NOT NULL,
    currency    text        NOT NULL,
    synthetic   boolean     NOT NULL,
    n           bigint      NOT NULL,
    n_synthetic bigint      NOT NULL,  -- n when synthetic, else 0: sums across both stay valid
    volume      numeric     NOT NULL,
    min_price   numeric     NOT NULL,
    max_price   numeric     NOT NULL,
    PRIMARY KEY (collection, kind, currency, synthetic, bucket)
);
CREATE TABLE rollup_1h (LIKE rollup_1m INCLUDING ALL);

INSERT INTO rollup_1m (bucket, collection, kind, currency, synthetic, n, n_synthetic, volume, min_price, max_price)
SELECT date_bin('1 minute', ts, timestamptz 'epoch'), collection, kind, currency, synthetic,
       count(*), count(*) FILTER (WHERE synthetic), sum(price), min(price), max(price)
FROM (
    SELECT ts, collection, 'sales' AS kind, currency, synthetic, price FROM sales
    UNION ALL SELECT ts, collection, 'listings', currency, synthetic, price FROM listings
    UNION ALL SELECT ts, collection, 'bids', currency, synthetic, amount FROM bids
) e
GROUP BY 1, 2, 3, 4, 5;

INSERT INTO rollup_1h (bucket, collection, kind, currency, synthetic, n, n_synthetic, volume, min_price, max_price)
SELECT date_bin('1 hour', bucket, timestamptz 'epoch'), collection, kind, currency, synthetic,
       sum(n), sum(n_synthetic), sum(volume), min(min_price), max(max_price)
FROM rollup_1m
GROUP BY 1, 2, 3, 4, 5;

-- Each track of a recording remuxed on its own (the per-track originals): a JSON array of
-- {track, participant, kind, source, key, size, start_ms, duration_ms}; NULL when there are none
-- (recordings finished before originals were kept, or failed ones).
ALTER TABLE recordings ADD COLUMN originals TEXT;

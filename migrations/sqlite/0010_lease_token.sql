-- The fence names a token each claim draws at random, not the attempt number (as on
-- Postgres, migration 0013): a claim undone by a crash (SQLite's `synchronous = normal`
-- can lose the last commits on power loss) and made again by another process with the
-- same worker id at the same attempt does not share its lease.
alter table jobs add column lease_token text;

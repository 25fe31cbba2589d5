-- A batch's members are found by `trained_by = lead and status = 'coalesced'` on every
-- phase of the lead (claim, begin_training, publish, complete, fail, release). With the
-- status outside the index, Postgres' generic plan ANDed this index with `jobs_live`'s
-- whole 'coalesced' range (dead entries included): a quarter of the database's CPU in
-- `claas bench queue`. One index on both columns answers it with one descent.
drop index jobs_trained_by;
create index jobs_trained_by on jobs (trained_by, status) where trained_by is not null;

-- Members of a batch are looked up by (trained_by, status): one index for both (as on
-- Postgres, where the generic plan otherwise ANDed two indexes).
drop index jobs_trained_by;
create index jobs_trained_by on jobs (trained_by, status) where trained_by is not null;

-- As on Postgres: batch members indexed only while coalesced, no index of every live row
-- (the partial indexes of queued, running and coalesced rows count them), and a member's
-- timeline continues with its lead's events from `batch_event` on.
drop index jobs_trained_by;
create index jobs_batch_members on jobs (trained_by) where status = 'coalesced';
drop index jobs_live;
create index jobs_queued_age on jobs (created_at) where status = 'queued';
alter table jobs add column batch_event integer;

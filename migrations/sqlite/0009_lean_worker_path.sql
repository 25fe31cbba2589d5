-- As on Postgres: batch members looked up through an index of coalesced rows only, no
-- index of every live row (the partial indexes of queued, running and coalesced rows count
-- them), and a member's timeline continues with its lead's events from `batch_event` on.
-- `trained_by` stays a foreign key here (SQLite cannot drop one in place), so its index of
-- every member stays too.
create index jobs_batch_members on jobs (trained_by) where status = 'coalesced';
drop index jobs_live;
create index jobs_queued_age on jobs (created_at) where status = 'queued';
alter table jobs add column batch_event integer;
update jobs set batch_event = (
    select max(e.id) from job_events e where e.job_id = jobs.trained_by and e.phase = 'claimed')
where status = 'coalesced';

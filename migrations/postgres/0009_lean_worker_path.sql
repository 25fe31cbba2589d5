-- Fewer index entries and event rows per job on the worker path. Every status change is a
-- non-HOT update (the status is in partial-index predicates), so each new row version goes
-- into every index whose predicate it meets; `claas bench queue` is bound by that work.

-- A batch's members are only ever looked up while they are `coalesced` (the lead's
-- claim, begin_training, publish and settling). Finished members now leave this index.
drop index jobs_trained_by;
create index jobs_batch_members on jobs (trained_by) where status = 'coalesced';
-- So `trained_by` is no longer a foreign key: its `on delete set null` looks the deleted
-- job's members up by `trained_by` alone, which needs an index of every member ever (two
-- more entries per member). Deleting a job clears its members' link itself, finding them
-- through `jobs_lora_id` (a member shares its lead's LoRA); retention deletes a batch's
-- jobs together (they finish in one transaction).
alter table jobs drop constraint jobs_trained_by_fkey;

-- Live counts no longer need an index of every live row: queued, running and coalesced
-- rows are each in a partial index already (claim order, one running per LoRA, batch
-- members). The oldest queued job is read from an index of queued rows only.
drop index jobs_live;
create index jobs_queued_age on jobs (created_at) where status = 'queued';

-- A member's timeline is its own events, then its lead's from the lead's `claimed` event
-- at which it joined (this id): a batch no longer writes one event per member per phase.
alter table jobs add column batch_event bigint;
-- Members in flight during the upgrade follow their lead's latest claim (they also keep
-- the per-member events written before it).
update jobs m set batch_event = (
    select max(e.id) from job_events e where e.job_id = m.trained_by and e.phase = 'claimed')
where m.status = 'coalesced';

-- The dashboard's jobs page filters by worker, newest first, without scanning other
-- workers' jobs.
create index jobs_by_worker on jobs (worker_id, id desc) where worker_id is not null;

-- What operators did from the dashboard (cancel, retry, delete). Not tied to `jobs` by a
-- foreign key: a deleted job's deletion stays on record.
create table audit_log (
    id      integer primary key autoincrement,
    at      integer not null,
    actor   text not null,
    action  text not null,
    job_id  text,
    detail  text not null default ''
);

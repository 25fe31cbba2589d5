-- Enqueue no longer notifies from a trigger. A transaction that calls `pg_notify` takes a
-- database-wide lock at commit and holds it until its commit record is flushed, so every
-- enqueue serialised behind every other enqueue's WAL flush (`claas bench api` p99 20–80 ms
-- at 1,000 requests/s on a 2-core host, 10 ms without the trigger). The store now sends one
-- notification after its enqueues commit, at most one per 10 ms per process; workers still
-- poll, so a wake-up lost in a crash only delays a claim.
drop trigger jobs_notify on jobs;
drop function claas_jobs_notify();

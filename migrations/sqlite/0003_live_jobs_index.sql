-- Queue depth and the oldest queued job for /metrics and the dashboard without scanning
-- finished jobs: only the few live rows are in this index.
create index jobs_live on jobs (status, created_at)
    where status in ('queued', 'running', 'coalesced');

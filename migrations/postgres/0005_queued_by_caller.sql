-- Per-key backpressure counts a key's queued jobs on every feedback request: only the
-- queued rows are in this index.
create index jobs_queued_by_caller on jobs (caller) where status = 'queued';

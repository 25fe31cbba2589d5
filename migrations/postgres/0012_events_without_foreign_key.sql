-- A job's events no longer reference it through a foreign key. Its check ran a query and
-- took a key-share lock on the job's row for every event inserted, on a row the same
-- statement had just locked or written: ~5 % of Postgres' CPU in `claas bench queue`.
-- Events are only written by statements that lock or write their job's row, and the two
-- statements that delete jobs (retention and the dashboard's delete) now delete the jobs'
-- events with them, as the foreign key's `on delete cascade` did.
alter table job_events drop constraint job_events_job_id_fkey;

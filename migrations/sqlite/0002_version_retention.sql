-- Adapter retention: a pinned version's files are never removed; `pruned_at` records when
-- a version's files were removed (the row stays: the history names every version).
alter table lora_versions add column pinned integer not null default 0;
alter table lora_versions add column pruned_at integer;

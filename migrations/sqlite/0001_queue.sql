-- The durable feedback queue, SQLite mirror of migrations/postgres/0001_queue.sql.
-- Timestamps are integer milliseconds since the Unix epoch (SQLite has no timestamp type and
-- integer comparison keeps the claim order exact); uuids and JSON are text.

create table loras (
    lora_id         text primary key check (length(lora_id) between 1 and 128),
    base_model      text not null,
    rank            integer not null check (rank > 0),
    alpha           real not null,
    target_modules  text not null,
    current_version integer not null default 0,
    created_at      integer not null,
    updated_at      integer not null,
    deleted_at      integer
);

create table lora_versions (
    lora_id     text not null references loras (lora_id),
    version     integer not null check (version >= 0),
    storage_uri text not null,
    sha256      text not null,
    job_id      text,
    metrics     text,
    created_at  integer not null,
    primary key (lora_id, version)
);

create table jobs (
    id                text primary key,
    lora_id           text not null references loras (lora_id),
    base_model        text not null,
    caller            text not null default '',
    status            text not null default 'queued'
        check (status in ('queued', 'running', 'coalesced', 'succeeded', 'failed', 'cancelled')),
    phase             text not null default 'queued',
    payload           text not null,
    sample_count      integer not null check (sample_count > 0),
    coalesce_key      text not null,
    orchestration     text not null,
    priority          integer not null default 0,
    attempt           integer not null default 0,
    max_attempts      integer not null default 3 check (max_attempts > 0),
    run_at            integer not null,
    worker_id         text,
    lease_expires_at  integer,
    cancel_requested  integer not null default 0,
    idempotency_key   text,
    request_hash      text,
    trace_context     text,
    timings_ms        text not null default '{}',
    result            text,
    error             text,
    trained_by        text references jobs (id) on delete set null,
    published_version integer,
    created_at        integer not null,
    started_at        integer,
    finished_at       integer,
    check ((status in ('succeeded', 'failed', 'cancelled')) = (finished_at is not null))
);

create unique index jobs_one_running_per_lora on jobs (lora_id) where status = 'running';
create index jobs_claim_order on jobs (priority desc, run_at, id) where status = 'queued';
create index jobs_queued_by_lora on jobs (lora_id, priority desc, run_at, id) where status = 'queued';
create index jobs_trained_by on jobs (trained_by) where trained_by is not null;
create unique index jobs_idempotency on jobs (caller, idempotency_key) where idempotency_key is not null;
create index jobs_lora_id on jobs (lora_id, id desc);
create index jobs_finished_at on jobs (finished_at) where finished_at is not null;

create table job_events (
    id      integer primary key autoincrement,
    job_id  text not null references jobs (id) on delete cascade,
    at      integer not null,
    phase   text not null,
    message text not null
);
create index job_events_job on job_events (job_id, id);

create table workers (
    id           text primary key,
    hostname     text not null,
    gpu          text,
    vllm_url     text,
    base_models  text not null default '[]',
    state        text not null default 'idle'
        check (state in ('idle', 'training', 'draining', 'sleeping', 'stopped')),
    version      text not null,
    started_at   integer not null,
    heartbeat_at integer not null,
    current_job  text
);

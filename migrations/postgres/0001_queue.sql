-- The durable feedback queue. Every rule in DESIGN.md "The queue" that the database can
-- enforce is enforced here, not in process memory.

-- One row per LoRA adapter. `lora_id` follows DESIGN.md's pattern; the length cap keeps
-- ids usable as vLLM adapter names and storage keys.
create table loras (
    lora_id         text primary key check (char_length(lora_id) between 1 and 128),
    base_model      text not null,
    rank            integer not null check (rank > 0),
    alpha           double precision not null,
    target_modules  jsonb not null,
    current_version integer not null default 0,
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now(),
    deleted_at      timestamptz
);

-- Published adapter versions. Version 0 is the initial adapter; a job's version and the job's
-- `published_version` are written in one transaction (exactly-once training).
create table lora_versions (
    lora_id     text not null references loras (lora_id),
    version     integer not null check (version >= 0),
    storage_uri text not null,
    sha256      text not null,
    job_id      uuid,
    metrics     jsonb,
    created_at  timestamptz not null default now(),
    primary key (lora_id, version)
);

create table jobs (
    id                uuid primary key,
    lora_id           text not null references loras (lora_id),
    -- Copied from the LoRA at enqueue so the claim filters by base model without a join.
    base_model        text not null,
    -- Who enqueued it (API key id, or '' when auth is off): idempotency keys are per caller.
    caller            text not null default '',
    status            text not null default 'queued'
        check (status in ('queued', 'running', 'coalesced', 'succeeded', 'failed', 'cancelled')),
    phase             text not null default 'queued',
    payload           jsonb not null,
    -- Number of feedback samples in `payload`; coalescing caps a batch by samples, not jobs.
    sample_count      integer not null check (sample_count > 0),
    -- Hash of training config, orchestration flags and caller: only jobs with equal keys may
    -- train in one batch.
    coalesce_key      text not null,
    orchestration     jsonb not null,
    priority          integer not null default 0,
    attempt           integer not null default 0,
    max_attempts      integer not null default 3 check (max_attempts > 0),
    run_at            timestamptz not null default now(),
    worker_id         text,
    lease_expires_at  timestamptz,
    cancel_requested  boolean not null default false,
    idempotency_key   text,
    -- SHA-256 of the request body, to tell a replay (same job) from a conflicting reuse (422).
    request_hash      text,
    trace_context     jsonb,
    timings_ms        jsonb not null default '{}'::jsonb,
    result            jsonb,
    error             jsonb,
    -- Set when this job joined another job's batch: the job that trains it.
    trained_by        uuid references jobs (id) on delete set null,
    -- Set in the same transaction that records the new adapter version: a retry after this
    -- point resumes after publish and never trains the same feedback again.
    published_version integer,
    created_at        timestamptz not null default now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    check ((status in ('succeeded', 'failed', 'cancelled')) = (finished_at is not null))
);

-- Rule 1: at most one running job per LoRA in the whole fleet.
create unique index jobs_one_running_per_lora on jobs (lora_id) where status = 'running';
-- The claim's scan: queued jobs in claim order. Not keyed by base model: a worker may serve
-- several, and `base_model = any(...)` on a leading column would cost the index its order
-- (the planner then sorts the whole queue on every claim). Fleets mostly serve one model.
create index jobs_claim_order on jobs (priority desc, run_at, id) where status = 'queued';
-- Coalescing: queued jobs of one LoRA in claim order. Without it the generic plan ANDs
-- the LoRA index with a range over every queued job (a bitmap of the whole queue per claim).
create index jobs_queued_by_lora on jobs (lora_id, priority desc, run_at, id) where status = 'queued';
-- Members of a running batch, found from the job that trains them.
create index jobs_trained_by on jobs (trained_by) where trained_by is not null;
create unique index jobs_idempotency on jobs (caller, idempotency_key) where idempotency_key is not null;
-- Listing a LoRA's jobs newest first, and retention by age.
create index jobs_lora_id on jobs (lora_id, id desc);
create index jobs_finished_at on jobs (finished_at) where finished_at is not null;

-- The append-only timeline of each job.
create table job_events (
    id      bigint generated always as identity primary key,
    job_id  uuid not null references jobs (id) on delete cascade,
    at      timestamptz not null default now(),
    phase   text not null,
    message text not null
);
create index job_events_job on job_events (job_id, id);

create table workers (
    id           text primary key,
    hostname     text not null,
    gpu          text,
    vllm_url     text,
    base_models  jsonb not null default '[]'::jsonb,
    state        text not null default 'idle'
        check (state in ('idle', 'training', 'draining', 'sleeping', 'stopped')),
    version      text not null,
    started_at   timestamptz not null default now(),
    heartbeat_at timestamptz not null default now(),
    current_job  uuid
);

-- Rule 5: wake idle workers at once. One notification per inserting statement (Postgres
-- folds equal notifications in a transaction); workers also poll, so a lost one only delays.
create function claas_jobs_notify() returns trigger language plpgsql as $$
begin
    perform pg_notify('claas_jobs', '');
    return null;
end
$$;
create trigger jobs_notify after insert on jobs for each statement execute function claas_jobs_notify();

-- API keys. Only the SHA-256 of a secret is stored; the secret is shown once at creation.
-- A key limited to LoRA id prefixes sees and acts only on those LoRAs and their jobs.
create table api_keys (
    id          text primary key,
    name        text not null,
    prefixes    jsonb not null default '[]'::jsonb,
    admin       boolean not null default false,
    secret_hash text not null unique,
    created_at  timestamptz not null default now(),
    revoked_at  timestamptz
);

-- API keys. Only the SHA-256 of a secret is stored; the secret is shown once at creation.
-- A key limited to LoRA id prefixes sees and acts only on those LoRAs and their jobs.
create table api_keys (
    id          text primary key,
    name        text not null,
    prefixes    text not null default '[]',
    admin       integer not null default 0,
    secret_hash text not null unique,
    created_at  integer not null,
    revoked_at  integer
);

-- Adapters an API replica asked a node's worker to load into that node's vLLM: with
-- versions in an object store only the node can materialise them where its vLLM reads.
-- One row per (vLLM, LoRA); the worker takes (deletes) the rows for its vLLM when idle.
create table adapter_requests (
    vllm_url     text not null,
    lora_id      text not null,
    requested_at integer not null,
    primary key (vllm_url, lora_id)
);

-- CLaaS clients address a LoRA by the name vLLM knows it under: its id with each `/` as `-`
-- (`eval/no_emoji` -> `eval-no_emoji`). The API resolves such names to LoRAs on every request
-- that names one, so the expression is indexed. Not unique: databases may already hold two
-- LoRAs with one name (`a/b` and `a-b`); init refuses to create new ones.
create index loras_adapter_name on loras ((replace(lora_id, '/', '-'))) where deleted_at is null;

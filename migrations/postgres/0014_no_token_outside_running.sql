-- A job that is not running holds no lease token, whoever writes it. This version clears
-- the token in every statement that moves a job out of `running`; workers of a version
-- older than migration 0013 do not (their lease reaper, during a rolling upgrade), and
-- their claims write no token either. A token left on a requeued job would then pass the
-- fence again for the stalled worker that drew it, once an older worker with the same
-- worker id claimed the job. The trigger runs only for such a write (its WHEN clause
-- filters every other row without calling it).
create function claas_jobs_clear_lease_token() returns trigger language plpgsql as $$
begin
    new.lease_token := null;
    return new;
end
$$;
create trigger jobs_no_token_outside_running before update of status on jobs
    for each row when (new.status <> 'running' and new.lease_token is not null)
    execute function claas_jobs_clear_lease_token();

-- The fence names a token each claim draws at random, not the attempt number. Claims and
-- completions commit without waiting for their WAL flush, so a crash can undo a claim;
-- the same job can then be claimed again at the same attempt, and by a process configured
-- with the same worker id (an old one still in its shutdown grace). With the attempt as
-- the fence both would hold the lease; with a token drawn per claim, only the second.
-- Jobs claimed before this migration have no token: the workers that hold them (older
-- binaries) fence by attempt, and their retries draw one.
alter table jobs add column lease_token uuid;

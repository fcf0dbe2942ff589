-- Session continuity (PROTOCOL.md §1.8, §3.1): a running run whose device went
-- away is detached, not failed, and resumed by the device's next hello within
-- GATEWAY_RUN_RESUME_S.

ALTER TABLE agent_run_logs
    ADD COLUMN detached_at   timestamptz,
    ADD COLUMN detach_reason text;

-- Resume on hello: a device's detached runs.
CREATE INDEX agent_run_logs_detached_device_idx
    ON agent_run_logs (user_id, device_id)
    WHERE status = 'running' AND detached_at IS NOT NULL;

-- Expiry: detached runs whose window has passed, oldest first.
CREATE INDEX agent_run_logs_detached_at_idx
    ON agent_run_logs (detached_at)
    WHERE status = 'running' AND detached_at IS NOT NULL;

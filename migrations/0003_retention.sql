-- Retention (GATEWAY_RETENTION_DAYS): finished runs by age, oldest first.
--
-- Partial, so it only holds finished runs, and small next to agent_run_events.
-- Building it holds a SHARE lock on agent_run_logs (run inserts and updates
-- wait, events do not) for as long as the build takes: about a second per
-- million runs. An operator with a huge table creates it beforehand, outside
-- any transaction, with the same definition and CONCURRENTLY; IF NOT EXISTS
-- then makes this migration a no-op (README, "Retention").
CREATE INDEX IF NOT EXISTS agent_run_logs_finished_idx
    ON agent_run_logs (finished_at)
    WHERE status IN ('completed', 'error', 'cancelled');

-- Agent runs and the events their devices stream (PROTOCOL.md §3).

CREATE TABLE agent_run_logs (
    id               uuid PRIMARY KEY,
    user_id          text        NOT NULL,
    agent_id         text        NOT NULL,
    -- The requested device while pending (NULL: any device of the user),
    -- then the device the run was dispatched to.
    device_id        text,
    status           text        NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'completed', 'error', 'cancelled')),
    input            jsonb       NOT NULL DEFAULT '{}'::jsonb,
    result           jsonb,
    errors           jsonb       NOT NULL DEFAULT '[]'::jsonb,
    scheduled_at     timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    event_count      integer     NOT NULL DEFAULT 0,
    -- GATEWAY_INSTANCE_ID of the process that dispatched it; a restarted
    -- process marks its own orphaned running runs as errors.
    gateway_instance text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- §3.3 claim on hello: a user's due pending runs.
CREATE INDEX agent_run_logs_pending_idx
    ON agent_run_logs (user_id, agent_id, scheduled_at)
    WHERE status = 'pending';

-- The scheduler: pending runs falling due in a time window.
CREATE INDEX agent_run_logs_pending_due_idx
    ON agent_run_logs (scheduled_at)
    WHERE status = 'pending';

-- §2.3 listing: a user's runs (optionally by status), newest first.
CREATE INDEX agent_run_logs_user_created_idx
    ON agent_run_logs (user_id, created_at DESC);
CREATE INDEX agent_run_logs_user_status_created_idx
    ON agent_run_logs (user_id, status, created_at DESC);

-- §3.1 start-up: this instance's orphaned running runs.
CREATE INDEX agent_run_logs_running_instance_idx
    ON agent_run_logs (gateway_instance)
    WHERE status = 'running';

CREATE TABLE agent_run_events (
    run_id      uuid        NOT NULL REFERENCES agent_run_logs (id) ON DELETE CASCADE,
    seq         integer     NOT NULL CHECK (seq > 0),
    data        jsonb       NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, seq)
);

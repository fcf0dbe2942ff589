-- Several gateway processes on one PostgreSQL (PROTOCOL.md §5): who is alive,
-- and which process holds which device.

-- One row per live process, heart-beaten every GATEWAY_INSTANCE_TTL_S / 3; a
-- row older than the TTL is a dead process, removed by whichever live one
-- notices first (its presence removed, its running runs detached).
CREATE TABLE gateway_instances (
    instance_id   text PRIMARY KEY,
    advertise_url text,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per connected device. A replacement overwrites the row of its
-- (user, device); a connection's cleanup deletes by its own connection_id, so
-- the cleanup of a replaced connection never deletes its successor's row.
CREATE TABLE device_presence (
    user_id       text NOT NULL,
    device_id     text NOT NULL,
    instance_id   text NOT NULL,
    connection_id text NOT NULL,
    agent_ids     text[] NOT NULL DEFAULT '{}',
    connected_at  timestamptz NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

CREATE UNIQUE INDEX device_presence_connection_idx ON device_presence (connection_id);
CREATE INDEX device_presence_instance_idx ON device_presence (instance_id);

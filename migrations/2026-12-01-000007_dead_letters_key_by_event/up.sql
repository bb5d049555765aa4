-- A dead letter is the event (id, event_id), not the outbox id alone: after a restore that reset
-- the outbox identity below existing dead letters, a new event can take an id a dead letter
-- already has. Keyed by id only, dead-lettering it replaced the older dead letter, which was
-- then lost; now both are kept. The same event dead-lettered again (re-queued by hand with its
-- id and event id) still updates its row.
ALTER TABLE outbox_dead_letters DROP CONSTRAINT outbox_dead_letters_pkey;
ALTER TABLE outbox_dead_letters ADD CONSTRAINT outbox_dead_letters_pkey PRIMARY KEY (id, event_id);

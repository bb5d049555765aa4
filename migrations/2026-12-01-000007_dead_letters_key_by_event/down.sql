ALTER TABLE outbox_dead_letters DROP CONSTRAINT outbox_dead_letters_pkey;
ALTER TABLE outbox_dead_letters ADD CONSTRAINT outbox_dead_letters_pkey PRIMARY KEY (id);

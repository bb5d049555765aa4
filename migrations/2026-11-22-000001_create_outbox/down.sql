DROP TABLE outbox_relay_state;
DROP TABLE outbox_dead_letters;
DROP TABLE outbox;

DROP INDEX outbox_dead_letters_key_idx;
CREATE INDEX outbox_dead_letters_topic_key_idx ON outbox_dead_letters (topic, partition_key);

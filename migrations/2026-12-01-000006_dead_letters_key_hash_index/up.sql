-- A key the outbox accepts must be one its dead letters accept too: a btree entry holds at most
-- about 2.7 kB, so an event with a longer partition_key (which `outbox` takes: nothing indexes
-- it there) could not be dead-lettered, and the relay retried moving it forever. A hash index
-- stores a 4-byte hash of any length of key and still serves `dead-letters --key K`.
DROP INDEX outbox_dead_letters_topic_key_idx;
CREATE INDEX outbox_dead_letters_key_idx ON outbox_dead_letters USING hash (partition_key);

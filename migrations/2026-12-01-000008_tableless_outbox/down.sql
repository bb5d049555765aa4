DROP FUNCTION outbox_emit(text, text, text, bytea, jsonb, text, text, uuid);
DROP FUNCTION outbox_message_prefix();

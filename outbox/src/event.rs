//! The event envelope and its validation.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use crate::trace::{current_traceparent, Traceparent};
use crate::{Error, Result};

/// The content type of events built with [`EventBuilder::json`]: `application/json`.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// Longest topic name Kafka accepts.
pub const MAX_TOPIC_LEN: usize = 249;
/// Longest event type, content type and header name accepted (bytes).
pub const MAX_NAME_LEN: usize = 255;

/// Header names the relay sets itself (CloudEvents binary mode and W3C trace context); user
/// headers may not use them. Names starting with `ce_` are reserved too.
pub const RESERVED_HEADERS: &[&str] = &["content-type", "traceparent", "tracestate"];

/// One event, validated and ready to enqueue.
///
/// Build it with [`Event::builder`] or [`Event::json`]. The relay publishes it to `topic` with
/// `key` as the Kafka message key and `payload` as the value; see `docs/TABLES.md` for the headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub(crate) event_id: Uuid,
    pub(crate) topic: String,
    pub(crate) key: String,
    pub(crate) event_type: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) content_type: String,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) traceparent: Option<Traceparent>,
}

impl Event {
    /// Starts an event for `topic`, partitioned and ordered by `key`, of type `event_type`.
    pub fn builder(
        topic: impl Into<String>,
        key: impl Into<String>,
        event_type: impl Into<String>,
    ) -> EventBuilder {
        EventBuilder {
            topic: topic.into(),
            key: key.into(),
            event_type: event_type.into(),
            payload: Payload::Missing,
            headers: Vec::new(),
            event_id: None,
            traceparent: TraceSource::Current,
        }
    }

    /// Shortcut for an event whose payload is `payload` serialized as JSON, with all defaults.
    ///
    /// # Errors
    /// As [`EventBuilder::build`].
    pub fn json<T: Serialize + ?Sized>(
        topic: impl Into<String>,
        key: impl Into<String>,
        event_type: impl Into<String>,
        payload: &T,
    ) -> Result<Self> {
        Self::builder(topic, key, event_type).json(payload).build()
    }

    /// The event id (a UUIDv7 unless set). Consumers deduplicate on it.
    #[must_use]
    pub fn event_id(&self) -> Uuid {
        self.event_id
    }

    /// The Kafka topic.
    #[must_use]
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The partition key.
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The event type (`ce_type`).
    #[must_use]
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The payload bytes.
    #[must_use]
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The payload's media type.
    #[must_use]
    pub fn content_type(&self) -> &str {
        &self.content_type
    }

    /// User headers.
    #[must_use]
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }

    /// The writer's trace context, if any.
    #[must_use]
    pub fn traceparent(&self) -> Option<Traceparent> {
        self.traceparent
    }

    /// Deserializes a JSON payload.
    ///
    /// # Errors
    /// [`Error::InvalidJson`] when the payload is not JSON of type `T`.
    pub fn payload_json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.payload).map_err(Error::InvalidJson)
    }
}

#[derive(Debug)]
enum Payload {
    Missing,
    Json(Result<Vec<u8>, serde_json::Error>),
    Raw {
        bytes: Vec<u8>,
        content_type: String,
    },
}

#[derive(Debug)]
enum TraceSource {
    Current,
    Explicit(String),
    None,
}

/// Builds an [`Event`]. Defaults: a new UUIDv7 event id, no user headers, and the trace context of
/// the current span (see [`crate::trace`]). A payload is required.
#[derive(Debug)]
#[must_use]
pub struct EventBuilder {
    topic: String,
    key: String,
    event_type: String,
    payload: Payload,
    headers: Vec<(String, String)>,
    event_id: Option<Uuid>,
    traceparent: TraceSource,
}

impl EventBuilder {
    /// Payload: `value` serialized as JSON, content type `application/json`.
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        self.payload = Payload::Json(serde_json::to_vec(value));
        self
    }

    /// Payload: raw bytes of the given media type. If the media type is JSON (`application/json`
    /// or any `+json` type), the bytes must be valid JSON.
    pub fn bytes(mut self, bytes: impl Into<Vec<u8>>, content_type: impl Into<String>) -> Self {
        self.payload = Payload::Raw {
            bytes: bytes.into(),
            content_type: content_type.into(),
        };
        self
    }

    /// Adds a user header (sent as a Kafka header). Later values for the same name replace
    /// earlier ones.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the event id instead of a new UUIDv7 (for example to derive it from a business key).
    pub fn event_id(mut self, id: Uuid) -> Self {
        self.event_id = Some(id);
        self
    }

    /// Sets the W3C `traceparent` explicitly instead of taking the current span's.
    pub fn traceparent(mut self, value: impl Into<String>) -> Self {
        self.traceparent = TraceSource::Explicit(value.into());
        self
    }

    /// Records no trace context.
    pub fn without_trace(mut self) -> Self {
        self.traceparent = TraceSource::None;
        self
    }

    /// Validates and builds the event.
    ///
    /// # Errors
    /// One error naming the first problem found: [`Error::InvalidTopic`], [`Error::InvalidKey`], [`Error::MissingPayload`],
    /// [`Error::InvalidEventType`], [`Error::InvalidContentType`], [`Error::InvalidJson`],
    /// [`Error::InvalidHeader`], [`Error::InvalidTraceparent`].
    pub fn build(self) -> Result<Event> {
        validate_topic(&self.topic)?;
        validate_key(&self.key)?;
        validate_event_type(&self.event_type)?;
        let (payload, content_type) = match self.payload {
            Payload::Missing => return Err(Error::MissingPayload),
            Payload::Json(r) => (r.map_err(Error::InvalidJson)?, JSON_CONTENT_TYPE.to_owned()),
            Payload::Raw {
                bytes,
                content_type,
            } => {
                validate_content_type(&content_type)?;
                if is_json_media_type(&content_type) {
                    serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
                        .map_err(Error::InvalidJson)?;
                }
                (bytes, content_type)
            }
        };
        let mut headers = BTreeMap::new();
        for (name, value) in self.headers {
            validate_header(&name, &value)?;
            headers.insert(name, value);
        }
        let traceparent = match self.traceparent {
            TraceSource::Current => current_traceparent(),
            TraceSource::Explicit(s) => Some(s.parse()?),
            TraceSource::None => None,
        };
        Ok(Event {
            event_id: self.event_id.unwrap_or_else(Uuid::now_v7),
            topic: self.topic,
            key: self.key,
            event_type: self.event_type,
            payload,
            content_type,
            headers,
            traceparent,
        })
    }
}

/// Checks Kafka's topic naming rules: 1 to 249 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
///
/// # Errors
/// [`Error::InvalidTopic`] naming the rule.
pub fn validate_topic(topic: &str) -> Result<()> {
    let fail = |reason| {
        Err(Error::InvalidTopic {
            topic: topic.to_owned(),
            reason,
        })
    };
    if topic.is_empty() {
        return fail("must not be empty");
    }
    if topic == "." || topic == ".." {
        return fail("'.' and '..' are not allowed");
    }
    if topic.len() > MAX_TOPIC_LEN {
        return fail("longer than 249 characters");
    }
    if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return fail("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidKey {
            reason: "must not be empty (the key decides the partition and so the order)",
        });
    }
    if key.contains('\0') {
        // Postgres text cannot hold NUL; fail here with a clear message rather than in the driver.
        return Err(Error::InvalidKey {
            reason: "must not contain NUL characters",
        });
    }
    Ok(())
}

fn validate_event_type(event_type: &str) -> Result<()> {
    let fail = |reason| {
        Err(Error::InvalidEventType {
            event_type: event_type.to_owned(),
            reason,
        })
    };
    if event_type.is_empty() {
        return fail("must not be empty");
    }
    if event_type.len() > MAX_NAME_LEN {
        return fail("longer than 255 bytes");
    }
    if event_type.chars().any(char::is_control) {
        return fail("must not contain control characters");
    }
    Ok(())
}

fn validate_content_type(content_type: &str) -> Result<()> {
    let fail = |reason| {
        Err(Error::InvalidContentType {
            content_type: content_type.to_owned(),
            reason,
        })
    };
    if content_type.is_empty() {
        return fail("must not be empty");
    }
    if content_type.len() > MAX_NAME_LEN {
        return fail("longer than 255 bytes");
    }
    if !content_type.is_ascii() || content_type.chars().any(|c| c.is_ascii_control()) {
        return fail("must be printable ASCII");
    }
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    match essence.split_once('/') {
        Some((t, s)) if !t.is_empty() && !s.is_empty() && !s.contains('/') => Ok(()),
        _ => fail("expected a media type such as application/json"),
    }
}

fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

fn validate_header(name: &str, value: &str) -> Result<()> {
    let fail = |reason| {
        Err(Error::InvalidHeader {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("name must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return fail("name longer than 255 bytes");
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return fail("name must be printable ASCII without spaces");
    }
    let lower = name.to_ascii_lowercase();
    if lower.starts_with("ce_") || RESERVED_HEADERS.contains(&lower.as_str()) {
        return fail("name is reserved: the relay sets ce_*, content-type and trace headers");
    }
    if value.contains('\0') {
        return fail("value must not contain NUL characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> EventBuilder {
        Event::builder("orders", "order-1", "OrderCreated")
    }

    #[test]
    fn json_event_has_documented_defaults() {
        let e = Event::json(
            "orders",
            "order-1",
            "OrderCreated",
            &serde_json::json!({"n": 1}),
        )
        .unwrap();
        assert_eq!(e.content_type(), JSON_CONTENT_TYPE);
        assert_eq!(e.event_id().get_version_num(), 7);
        assert!(e.headers().is_empty());
        assert_eq!(e.traceparent(), None);
        assert_eq!(e.payload(), br#"{"n":1}"#);
    }

    #[test]
    fn topic_rules() {
        for (t, ok) in [
            ("a", true),
            ("A.b_c-1", true),
            (&*"x".repeat(249), true),
            ("", false),
            (".", false),
            ("..", false),
            (&*"x".repeat(250), false),
            ("has space", false),
            ("slash/x", false),
            ("ünï", false),
        ] {
            assert_eq!(validate_topic(t).is_ok(), ok, "{t:?}");
        }
    }

    #[test]
    fn missing_payload_is_an_error() {
        assert!(matches!(base().build(), Err(Error::MissingPayload)));
    }

    #[test]
    fn raw_json_is_validated_but_other_types_are_not() {
        assert!(matches!(
            base().bytes("{not json", "application/json").build(),
            Err(Error::InvalidJson(_))
        ));
        assert!(matches!(
            base()
                .bytes("{", "application/cloudevents+json; charset=utf-8")
                .build(),
            Err(Error::InvalidJson(_))
        ));
        assert!(base()
            .bytes(vec![0xff, 0], "application/octet-stream")
            .build()
            .is_ok());
        assert!(matches!(
            base().bytes("x", "nonsense").build(),
            Err(Error::InvalidContentType { .. })
        ));
    }

    #[test]
    fn header_rules() {
        for (n, v) in [
            ("", "v"),
            ("has space", "v"),
            ("ce_id", "v"),
            ("CE_TYPE", "v"),
            ("content-type", "v"),
            ("Traceparent", "v"),
            ("ok", "nul\0"),
        ] {
            assert!(
                matches!(
                    base().json(&1).header(n, v).build(),
                    Err(Error::InvalidHeader { .. })
                ),
                "{n:?}={v:?}"
            );
        }
        let e = base()
            .json(&1)
            .header("x-tenant", "a")
            .header("x-tenant", "b")
            .build()
            .unwrap();
        assert_eq!(e.headers().get("x-tenant").map(String::as_str), Some("b"));
    }

    #[test]
    fn explicit_traceparent_is_validated() {
        assert!(matches!(
            base().json(&1).traceparent("nope").build(),
            Err(Error::InvalidTraceparent { .. })
        ));
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let e = base().json(&1).traceparent(tp).build().unwrap();
        assert_eq!(e.traceparent().unwrap().to_string(), tp);
    }
}

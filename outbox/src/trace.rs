//! W3C trace context for events.
//!
//! Every event records the `traceparent` of the span that wrote it, so the relay can put it on the
//! Kafka message and a consumer can continue the same trace. This module provides:
//!
//! - [`Traceparent`]: parse and format the W3C header (`00-<trace id>-<span id>-<flags>`);
//! - [`TraceContextLayer`]: a `tracing_subscriber` layer that gives every span a trace context
//!   (a new trace for a root span, the parent's trace for a child, or the remote parent's trace when
//!   the span is created with a `traceparent` field, which is how consumers continue a trace);
//! - [`current_traceparent`]: the context of the current span, or `None` when the layer is not
//!   installed or no span is entered.
//!
//! Services already running OpenTelemetry can pass the context explicitly with
//! [`EventBuilder::traceparent`](crate::EventBuilder::traceparent).

use std::fmt;
use std::str::FromStr;

use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::{Error, Result};

/// A parsed W3C `traceparent` (version 00).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Traceparent {
    trace_id: u128,
    parent_id: u64,
    flags: u8,
}

impl Traceparent {
    /// Builds a context from its parts.
    ///
    /// # Errors
    /// [`Error::InvalidTraceparent`] when either id is zero (the W3C spec forbids it).
    pub fn new(trace_id: u128, parent_id: u64, flags: u8) -> Result<Self> {
        let tp = Self {
            trace_id,
            parent_id,
            flags,
        };
        if trace_id == 0 || parent_id == 0 {
            return Err(Error::InvalidTraceparent {
                value: tp.to_string(),
            });
        }
        Ok(tp)
    }

    /// The 128-bit trace id.
    #[must_use]
    pub fn trace_id(&self) -> u128 {
        self.trace_id
    }

    /// The 64-bit id of the span that wrote the event (the consumer's parent span).
    #[must_use]
    pub fn parent_id(&self) -> u64 {
        self.parent_id
    }

    /// Trace flags (bit 0: sampled).
    #[must_use]
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// A new random root context, flagged as sampled.
    #[must_use]
    pub fn new_root() -> Self {
        Self {
            trace_id: nonzero_u128(),
            parent_id: nonzero_u64(),
            flags: 1,
        }
    }

    /// A child of this context: same trace and flags, new span id.
    #[must_use]
    pub fn child(&self) -> Self {
        Self {
            parent_id: nonzero_u64(),
            ..*self
        }
    }
}

fn nonzero_u128() -> u128 {
    loop {
        let v = uuid::Uuid::new_v4().as_u128();
        if v != 0 {
            return v;
        }
    }
}

fn nonzero_u64() -> u64 {
    loop {
        // Truncation is the point: 64 random bits of a v4 uuid.
        #[allow(clippy::cast_possible_truncation)]
        let v = uuid::Uuid::new_v4().as_u128() as u64;
        if v != 0 {
            return v;
        }
    }
}

impl fmt::Display for Traceparent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

impl FromStr for Traceparent {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidTraceparent {
            value: s.to_owned(),
        };
        let is_lower_hex = |p: &str| p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let parts: Vec<&str> = s.split('-').collect();
        let [version, trace, parent, flags] = parts.as_slice() else {
            return Err(bad());
        };
        if version.len() != 2 || *version != "00" {
            return Err(bad());
        }
        if trace.len() != 32 || parent.len() != 16 || flags.len() != 2 {
            return Err(bad());
        }
        if ![trace, parent, flags].iter().all(|p| is_lower_hex(p)) {
            return Err(bad());
        }
        let trace_id = u128::from_str_radix(trace, 16).map_err(|_| bad())?;
        let parent_id = u64::from_str_radix(parent, 16).map_err(|_| bad())?;
        let flags = u8::from_str_radix(flags, 16).map_err(|_| bad())?;
        Self::new(trace_id, parent_id, flags).map_err(|_| bad())
    }
}

/// Gives every span a W3C trace context; see the [module docs](self).
///
/// ```
/// use tracing_subscriber::prelude::*;
/// let subscriber = tracing_subscriber::registry().with(outbox::TraceContextLayer::new());
/// tracing::subscriber::with_default(subscriber, || {
///     let span = tracing::info_span!("create_order");
///     let _g = span.enter();
///     assert!(outbox::current_traceparent().is_some());
/// });
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceContextLayer {
    _private: (),
}

impl TraceContextLayer {
    /// The layer. Install it on a `tracing_subscriber::Registry`.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }
}

struct RemoteParent(Option<Traceparent>);

impl tracing::field::Visit for RemoteParent {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "traceparent" {
            self.0 = value.parse().ok();
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        if field.name() == "traceparent" {
            self.0 = format!("{value:?}").trim_matches('"').parse().ok();
        }
    }
}

impl<S> Layer<S> for TraceContextLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut remote = RemoteParent(None);
        attrs.record(&mut remote);
        let parent = remote.0.or_else(|| {
            span.parent()
                .and_then(|p| p.extensions().get::<Traceparent>().copied())
        });
        let tp = parent.map_or_else(Traceparent::new_root, |p| p.child());
        span.extensions_mut().insert(tp);
    }
}

/// The trace context of the current span, when [`TraceContextLayer`] is installed and a span is
/// entered.
#[must_use]
pub fn current_traceparent() -> Option<Traceparent> {
    tracing::Span::current()
        .with_subscriber(|(id, dispatch)| {
            let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
            let span = registry.span(id)?;
            let tp = span.extensions().get::<Traceparent>().copied();
            tp
        })
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::prelude::*;

    #[test]
    fn round_trips_the_w3c_example() {
        let s = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp: Traceparent = s.parse().unwrap();
        assert_eq!(tp.to_string(), s);
        assert_eq!(tp.flags(), 1);
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert!(bad.parse::<Traceparent>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn children_share_the_trace_and_remote_parents_are_continued() {
        let subscriber = tracing_subscriber::registry().with(TraceContextLayer::new());
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(current_traceparent(), None, "no span entered");
            let root = tracing::info_span!("root");
            let _r = root.enter();
            let a = current_traceparent().unwrap();
            let child = tracing::info_span!("child");
            let _c = child.enter();
            let b = current_traceparent().unwrap();
            assert_eq!(a.trace_id(), b.trace_id());
            assert_ne!(a.parent_id(), b.parent_id());

            let remote = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let consumer = tracing::info_span!("consume", traceparent = remote);
            let _k = consumer.enter();
            let c = current_traceparent().unwrap();
            assert_eq!(c.trace_id(), 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
            assert_ne!(c.parent_id(), 0x00f0_67aa_0ba9_02b7);
        });
    }

    #[test]
    fn without_the_layer_there_is_no_context() {
        let subscriber = tracing_subscriber::registry();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("root");
            let _g = span.enter();
            assert_eq!(current_traceparent(), None);
        });
    }
}

//! The VMM's event stream: what happened, as JSON lines, to every
//! subscriber (the API's `GET /api/v1/events`). A subscriber that does not
//! keep up loses events rather than slowing the VMM: each has a bounded
//! queue, and a full queue drops the event and counts it.

use std::io::{self, Read};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use crate::bus::lock;

/// Events queued per subscriber before new ones are dropped.
const QUEUE: usize = 1024;

/// Most subscribers at once; more are refused.
pub const MAX_SUBSCRIBERS: usize = 16;

/// Where events are published.
pub struct EventBus {
    started: Instant,
    subscribers: Mutex<Vec<SyncSender<String>>>,
    dropped: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("subscribers", &lock(&self.subscribers).len())
            .finish()
    }
}

impl EventBus {
    /// A bus with no subscribers; event times count from now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            subscribers: Mutex::new(Vec::new()),
            dropped: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Publishes `event` with `fields` (an object) to every subscriber.
    pub fn publish(&self, event: &str, fields: Value) {
        let mut line = Map::new();
        line.insert("time_ms".into(), json!(self.started.elapsed().as_millis() as u64));
        line.insert("event".into(), json!(event));
        if let Value::Object(fields) = fields {
            line.extend(fields);
        }
        let text = Value::Object(line).to_string();
        log::debug!("event {text}");
        lock(&self.subscribers).retain(|tx| match tx.try_send(text.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }

    /// A new subscriber, or `None` when [`MAX_SUBSCRIBERS`] are listening.
    pub fn subscribe(&self) -> Option<EventReader> {
        let mut subscribers = lock(&self.subscribers);
        if subscribers.len() >= MAX_SUBSCRIBERS {
            return None;
        }
        let (tx, rx) = sync_channel(QUEUE);
        subscribers.push(tx);
        Some(EventReader {
            rx,
            pending: Vec::new(),
            offset: 0,
            limit: None,
        })
    }

    /// Ends every stream (the VMM is stopping).
    pub fn close(&self) {
        lock(&self.subscribers).clear();
    }

    /// Events dropped because a subscriber's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One subscriber's stream as bytes: JSON lines, a bare newline every 15 s
/// while nothing happens (so a vanished client is noticed), end of file
/// when the bus closes or after `limit` events.
pub struct EventReader {
    rx: Receiver<String>,
    pending: Vec<u8>,
    offset: usize,
    limit: Option<u64>,
}

impl EventReader {
    /// Ends the stream after `count` events.
    pub fn with_limit(mut self, count: u64) -> Self {
        self.limit = Some(count);
        self
    }
}

impl EventReader {
    /// The next line of the stream (an event, or a bare keep-alive newline
    /// after 15 s of quiet), waiting for it; `None` at the end.
    pub fn next_line(&mut self) -> Option<Vec<u8>> {
        if self.limit == Some(0) {
            return None;
        }
        match self.rx.recv_timeout(KEEPALIVE) {
            Ok(line) => {
                if let Some(n) = &mut self.limit {
                    *n -= 1;
                }
                Some((line + "\n").into_bytes())
            }
            Err(RecvTimeoutError::Timeout) => Some(b"\n".to_vec()),
            Err(RecvTimeoutError::Disconnected) => None,
        }
    }
}

/// How long a quiet stream waits before a keep-alive line.
const KEEPALIVE: Duration = Duration::from_secs(15);

impl Read for EventReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.offset == self.pending.len() {
            match self.next_line() {
                Some(line) => self.pending = line,
                None => return Ok(0),
            }
            self.offset = 0;
        }
        let n = buf.len().min(self.pending.len() - self.offset);
        buf[..n].copy_from_slice(&self.pending[self.offset..self.offset + n]);
        self.offset += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_reach_subscribers_until_the_limit_or_close() {
        let bus = EventBus::new();
        let reader = bus.subscribe().unwrap().with_limit(2);
        let mut rest = bus.subscribe().unwrap();
        bus.publish("size-requested", json!({"id": "vmem0", "requested_size": 1}));
        bus.publish("reset", json!({}));
        bus.publish("power-off", json!({}));
        let mut text = String::new();
        { reader }.read_to_string(&mut text).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["event"], "size-requested");
        assert_eq!(lines[0]["requested_size"], 1);
        assert_eq!(lines[1]["event"], "reset");
        bus.close();
        let mut all = String::new();
        rest.read_to_string(&mut all).unwrap();
        assert_eq!(all.lines().count(), 3, "closing ends the stream after what was queued");
    }

    #[test]
    fn subscribers_are_bounded_and_slow_ones_lose_events() {
        let bus = EventBus::new();
        let keep: Vec<_> = (0..MAX_SUBSCRIBERS).map(|_| bus.subscribe().unwrap()).collect();
        assert!(bus.subscribe().is_none());
        for _ in 0..QUEUE + 5 {
            bus.publish("tick", json!({}));
        }
        assert_eq!(bus.dropped(), 5 * MAX_SUBSCRIBERS as u64);
        drop(keep);
        bus.publish("tick", json!({}));
        assert!(bus.subscribe().is_some(), "gone subscribers are forgotten");
    }
}

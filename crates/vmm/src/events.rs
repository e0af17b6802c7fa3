//! The VMM's event stream: what happened, as JSON lines, to every
//! subscriber (the API's `GET /api/v1/events`). A subscriber that does not
//! keep up loses events rather than slowing the VMM: each has a bounded
//! queue, and a full queue drops the event and counts it.
//!
//! Every event has a sequence number (`seq`, from 1), and the last
//! [`HISTORY`] are kept, so that a client can resume where it left off
//! ([`EventBus::subscribe_after`]): a long poll over one connection
//! (`?after=SEQ&timeout_ms=T`) misses nothing between its requests.

use std::collections::VecDeque;
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

/// Events kept for subscribers that resume after a sequence number.
pub const HISTORY: usize = 1024;

/// Where events are published.
pub struct EventBus {
    started: Instant,
    /// The subscribers and the history, under one lock so that a resuming
    /// subscriber gets every event exactly once.
    inner: Mutex<Inner>,
    dropped: std::sync::atomic::AtomicU64,
}

struct Inner {
    subscribers: Vec<SyncSender<String>>,
    /// The last [`HISTORY`] events, by sequence number.
    history: VecDeque<(u64, String)>,
    /// The last sequence number given.
    seq: u64,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("subscribers", &lock(&self.inner).subscribers.len())
            .finish()
    }
}

impl EventBus {
    /// A bus with no subscribers; event times count from now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            inner: Mutex::new(Inner {
                subscribers: Vec::new(),
                history: VecDeque::with_capacity(HISTORY),
                seq: 0,
            }),
            dropped: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Publishes `event` with `fields` (an object) to every subscriber.
    pub fn publish(&self, event: &str, fields: Value) {
        let mut inner = lock(&self.inner);
        inner.seq += 1;
        let seq = inner.seq;
        let mut line = Map::new();
        line.insert("seq".into(), json!(seq));
        line.insert("time_ms".into(), json!(self.started.elapsed().as_millis() as u64));
        line.insert("event".into(), json!(event));
        if let Value::Object(fields) = fields {
            line.extend(fields);
        }
        let text = Value::Object(line).to_string();
        log::debug!("event {text}");
        if inner.history.len() == HISTORY {
            inner.history.pop_front();
        }
        inner.history.push_back((seq, text.clone()));
        inner.subscribers.retain(|tx| match tx.try_send(text.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }

    /// A new subscriber of the events from now on, or `None` when
    /// [`MAX_SUBSCRIBERS`] are listening.
    pub fn subscribe(&self) -> Option<EventReader> {
        self.subscribe_after(u64::MAX)
    }

    /// A new subscriber that first gets the kept events numbered after
    /// `after` (0: all of them), then every new one; `None` when
    /// [`MAX_SUBSCRIBERS`] are listening. If events after `after` are no
    /// longer kept, the stream starts with an `events-lost` line.
    pub fn subscribe_after(&self, after: u64) -> Option<EventReader> {
        let mut inner = lock(&self.inner);
        if inner.subscribers.len() >= MAX_SUBSCRIBERS {
            return None;
        }
        let mut backlog: VecDeque<String> = inner
            .history
            .iter()
            .filter(|(seq, _)| *seq > after)
            .map(|(_, line)| line.clone())
            .collect();
        if let Some(&(oldest, _)) = inner.history.front()
            && after < oldest.saturating_sub(1)
        {
            let time_ms = self.started.elapsed().as_millis() as u64;
            let lost = json!({"time_ms": time_ms, "event": "events-lost", "after": after, "oldest": oldest});
            backlog.push_front(lost.to_string());
        }
        let (tx, rx) = sync_channel(QUEUE);
        inner.subscribers.push(tx);
        Some(EventReader {
            rx,
            backlog,
            pending: Vec::new(),
            offset: 0,
            limit: None,
            deadline: None,
        })
    }

    /// The sequence number of the last event (0 before the first).
    pub fn last_seq(&self) -> u64 {
        lock(&self.inner).seq
    }

    /// Ends every stream (the VMM is stopping).
    pub fn close(&self) {
        lock(&self.inner).subscribers.clear();
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
    /// Kept events to send before the live ones.
    backlog: VecDeque<String>,
    pending: Vec<u8>,
    offset: usize,
    limit: Option<u64>,
    deadline: Option<Instant>,
}

impl EventReader {
    /// Ends the stream after `count` events.
    pub fn with_limit(mut self, count: u64) -> Self {
        self.limit = Some(count);
        self
    }

    /// Ends the stream `timeout` from now, whatever came (a long poll).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.deadline = Some(Instant::now() + timeout);
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
        let line = match self.backlog.pop_front() {
            Some(line) => line,
            None => {
                let wait = match self.deadline {
                    Some(deadline) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return None;
                        }
                        left.min(KEEPALIVE)
                    }
                    None => KEEPALIVE,
                };
                match self.rx.recv_timeout(wait) {
                    Ok(line) => line,
                    Err(RecvTimeoutError::Timeout) if self.deadline.is_some_and(|d| Instant::now() >= d) => {
                        return None;
                    }
                    Err(RecvTimeoutError::Timeout) => return Some(b"\n".to_vec()),
                    Err(RecvTimeoutError::Disconnected) => return None,
                }
            }
        };
        if let Some(n) = &mut self.limit {
            *n -= 1;
        }
        Some((line + "\n").into_bytes())
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

    fn lines(reader: EventReader) -> Vec<Value> {
        let mut text = String::new();
        { reader }.read_to_string(&mut text).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn a_resumed_stream_misses_nothing_and_a_long_poll_ends() {
        let bus = EventBus::new();
        assert_eq!(bus.last_seq(), 0);
        bus.publish("a", json!({}));
        bus.publish("b", json!({}));
        assert_eq!(bus.last_seq(), 2);
        // Resuming after 1: the kept "b", then a live "c", then the poll ends.
        let reader = bus.subscribe_after(1).unwrap().with_timeout(Duration::from_millis(300));
        bus.publish("c", json!({}));
        let got = lines(reader);
        let kinds: Vec<_> = got
            .iter()
            .map(|l| (l["seq"].as_u64().unwrap(), l["event"].clone()))
            .collect();
        assert_eq!(kinds, [(2, json!("b")), (3, json!("c"))]);
        // A quiet long poll ends empty, without keep-alive lines.
        let quiet = bus.subscribe_after(3).unwrap().with_timeout(Duration::from_millis(50));
        assert!(lines(quiet).is_empty());
        // Resuming from before what is kept says so first.
        for _ in 0..HISTORY {
            bus.publish("tick", json!({}));
        }
        let old = lines(bus.subscribe_after(1).unwrap().with_limit(2));
        assert_eq!(old[0]["event"], "events-lost");
        assert_eq!(
            (old[0]["after"].as_u64(), old[0]["oldest"].as_u64()),
            (Some(1), Some(4))
        );
        assert_eq!(old[1]["seq"], 4);
        // A plain subscriber gets only new events.
        let new = bus.subscribe().unwrap().with_timeout(Duration::from_millis(50));
        assert!(lines(new).is_empty());
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

//! Line streams from the consoles and control ports, read on threads, logged to files and
//! kept as a tail for failure messages.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How many lines each stream keeps for failure messages.
const TAIL: usize = 40;

/// Lines read from one stream.
pub struct Lines {
    /// The stream's name (`l1`, `l2`, `ctl`).
    pub name: String,
    rx: Receiver<String>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

/// Why no line came.
#[derive(Debug, PartialEq, Eq)]
pub enum NoLine {
    /// Nothing within the time.
    Timeout,
    /// The stream ended.
    Closed,
}

impl Lines {
    /// Starts a thread reading `input` line by line into `log` (and stderr if `echo`).
    pub fn spawn(name: &str, input: impl Read + Send + 'static, mut log: File, echo: bool) -> Lines {
        let (tx, rx) = mpsc::channel();
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let (t, n) = (tail.clone(), name.to_string());
        thread::spawn(move || {
            let mut r = BufReader::new(input);
            let mut buf = Vec::new();
            while let Ok(len) = r.read_until(b'\n', &mut buf) {
                if len == 0 {
                    break;
                }
                let line = String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_string();
                buf.clear();
                let _ = writeln!(log, "{line}");
                if echo {
                    eprintln!("[{n}] {line}");
                }
                {
                    let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
                    if t.len() == TAIL {
                        t.pop_front();
                    }
                    t.push_back(line.clone());
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            name: name.to_string(),
            rx,
            tail,
        }
    }

    /// The next line, waiting at most until `deadline`.
    pub fn next_before(&self, deadline: Instant) -> Result<String, NoLine> {
        let wait = deadline.saturating_duration_since(Instant::now());
        self.next_within(wait)
    }

    /// The next line, waiting at most `wait`.
    pub fn next_within(&self, wait: Duration) -> Result<String, NoLine> {
        match self.rx.recv_timeout(wait) {
            Ok(l) => Ok(l),
            Err(RecvTimeoutError::Timeout) => Err(NoLine::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(NoLine::Closed),
        }
    }

    /// The last lines seen, prefixed with the stream's name.
    pub fn tail(&self) -> Vec<String> {
        let t = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        t.iter().map(|l| format!("[{}] {l}", self.name)).collect()
    }
}

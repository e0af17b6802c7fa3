//! A small QMP client: greeting, capabilities negotiation, commands; events are kept aside.

use std::io::{BufRead, BufReader, Read, Write};

use serde_json::{Value, json};

use crate::error::{Error, Result};

/// One message from a QMP server.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The greeting with the server's version.
    Greeting(Value),
    /// A successful command's return value.
    Return(Value),
    /// A failed command.
    Error {
        /// The error class.
        class: String,
        /// The description.
        desc: String,
    },
    /// An asynchronous event.
    Event {
        /// The event's name.
        name: String,
        /// Its data (or null).
        data: Value,
    },
}

/// Classifies one line of QMP output.
pub fn parse_message(line: &str) -> Result<Message> {
    let v: Value = serde_json::from_str(line).map_err(|e| Error::Vmm(format!("QMP: bad JSON {line:?}: {e}")))?;
    if let Some(g) = v.get("QMP") {
        return Ok(Message::Greeting(g.clone()));
    }
    if let Some(r) = v.get("return") {
        return Ok(Message::Return(r.clone()));
    }
    if let Some(e) = v.get("error") {
        let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        return Ok(Message::Error {
            class: s("class"),
            desc: s("desc"),
        });
    }
    if let Some(name) = v.get("event").and_then(Value::as_str) {
        return Ok(Message::Event {
            name: name.to_string(),
            data: v.get("data").cloned().unwrap_or(Value::Null),
        });
    }
    Err(Error::Vmm(format!("QMP: unexpected message {line}")))
}

/// The JSON text of a command.
pub fn command(execute: &str, arguments: Option<Value>) -> String {
    let mut v = json!({ "execute": execute });
    if let Some(a) = arguments {
        v["arguments"] = a;
    }
    v.to_string()
}

/// A QMP connection over any byte stream (with a read timeout set by the caller).
pub struct Qmp<S: Read + Write> {
    reader: BufReader<S>,
    writer: S,
    /// Events received while waiting for returns.
    pub events: Vec<(String, Value)>,
}

impl<S: Read + Write> Qmp<S> {
    /// Reads the greeting and negotiates capabilities; `writer` is a second handle on the
    /// same stream.
    pub fn connect(reader: S, writer: S) -> Result<Self> {
        let mut q = Qmp {
            reader: BufReader::new(reader),
            writer,
            events: Vec::new(),
        };
        // What a previous session on the same relay left unread (a `quit`'s return, the
        // events of a VMM that stopped) comes before the new VMM's greeting.
        loop {
            if let Message::Greeting(_) = q.next()? {
                break;
            }
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// Sends a command without waiting for its return (`quit`, whose return may not make it
    /// through a relay before the VMM and the relay are gone).
    pub fn send(&mut self, execute: &str) -> Result<()> {
        let mut text = command(execute, None);
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .and_then(|()| self.writer.flush())
            .map_err(|e| Error::Vmm(format!("QMP write: {e}")))
    }

    fn next(&mut self) -> Result<Message> {
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|e| Error::Vmm(format!("QMP read: {e}")))?;
            if n == 0 {
                return Err(Error::Vmm("QMP: connection closed".into()));
            }
            // The relay through L1 may deliver stray carriage returns or empty lines.
            let line = line.trim();
            if !line.is_empty() {
                return parse_message(line);
            }
        }
    }

    /// Runs a command and returns its return value.
    pub fn execute(&mut self, execute: &str, arguments: Option<Value>) -> Result<Value> {
        let mut text = command(execute, arguments);
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| Error::Vmm(format!("QMP write: {e}")))?;
        self.writer.flush().map_err(|e| Error::Vmm(format!("QMP write: {e}")))?;
        loop {
            match self.next()? {
                Message::Return(v) => return Ok(v),
                Message::Error { class, desc } => return Err(Error::Vmm(format!("{execute}: {class}: {desc}"))),
                Message::Event { name, data } => self.events.push((name, data)),
                Message::Greeting(_) => return Err(Error::Vmm("QMP: second greeting".into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::sync::{Arc, Mutex};

    /// A canned server: reads go through `input`, writes are collected.
    #[derive(Clone)]
    struct Canned {
        input: Arc<Mutex<Cursor<Vec<u8>>>>,
        output: Arc<Mutex<Vec<u8>>>,
    }
    impl Read for Canned {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.lock().unwrap().read(buf)
        }
    }
    impl Write for Canned {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn canned(text: &str) -> Canned {
        Canned {
            input: Arc::new(Mutex::new(Cursor::new(text.as_bytes().to_vec()))),
            output: Default::default(),
        }
    }

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}}"#;

    #[test]
    fn messages_are_classified() {
        assert!(matches!(parse_message(GREETING).unwrap(), Message::Greeting(_)));
        assert_eq!(parse_message(r#"{"return": {}}"#).unwrap(), Message::Return(json!({})));
        assert_eq!(
            parse_message(r#"{"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}}"#).unwrap(),
            Message::Error {
                class: "DeviceNotFound".into(),
                desc: "Device 'x' not found".into()
            }
        );
        let ev = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "MEMORY_DEVICE_SIZE_CHANGE", "data": {"id": "vmem0", "size": 1073741824, "qom-path": "/machine/peripheral/vmem0"}}"#;
        assert!(
            matches!(parse_message(ev).unwrap(), Message::Event { name, data } if name == "MEMORY_DEVICE_SIZE_CHANGE" && data["size"] == 1073741824u64)
        );
        assert!(parse_message("{\"what\": 1}").is_err());
        assert!(parse_message("not json").is_err());
    }

    #[test]
    fn a_session_negotiates_and_skips_events() {
        let server = canned(&format!(
            "{GREETING}\r\n{{\"return\": {{}}}}\n\n{{\"event\": \"X\", \"timestamp\": {{}}}}\n{{\"return\": 1073741824}}\n\
             {{\"error\": {{\"class\": \"GenericError\", \"desc\": \"no\"}}}}\n"
        ));
        let mut q = Qmp::connect(server.clone(), server.clone()).unwrap();
        let v = q
            .execute("qom-get", Some(json!({"path": "vmem0", "property": "size"})))
            .unwrap();
        assert_eq!(v, json!(1073741824u64));
        assert_eq!(q.events.len(), 1);
        let e = q.execute("quit", None).unwrap_err().to_string();
        assert!(e.contains("GenericError: no"), "{e}");
        let sent = String::from_utf8(server.output.lock().unwrap().clone()).unwrap();
        assert_eq!(
            sent,
            "{\"execute\":\"qmp_capabilities\"}\n\
             {\"arguments\":{\"path\":\"vmem0\",\"property\":\"size\"},\"execute\":\"qom-get\"}\n{\"execute\":\"quit\"}\n"
        );
    }

    #[test]
    fn what_a_previous_session_left_is_skipped_up_to_the_greeting() {
        let server = canned(&format!(
            "{{\"return\": {{}}}}\n{{\"event\": \"SHUTDOWN\", \"timestamp\": {{}}}}\n{GREETING}\n{{\"return\": {{}}}}\n"
        ));
        let mut q = Qmp::connect(server.clone(), server.clone()).unwrap();
        q.send("quit").unwrap();
        let sent = String::from_utf8(server.output.lock().unwrap().clone()).unwrap();
        assert_eq!(sent, "{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n");
        // Without a greeting at all, the end of the stream is an error, not a hang.
        let empty = canned("{\"return\": {}}\n");
        assert!(Qmp::connect(empty.clone(), empty).is_err());
    }
}

//! A tiny synchronous HTTP/1.1 client for memvisor's management API (JSON over a Unix socket,
//! keep-alive): one request at a time on one connection; bodies by `Content-Length` (chunked
//! bodies are read too, and a body without either ends with the connection).
//!
//! The lab's memvisor driver uses it over the relay from L1, and `memvisor api` over the
//! VMM's `--api-socket` directly.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// The most header bytes a response may have (a bound against a stream that is not HTTP).
const MAX_HEAD: usize = 64 * 1024;

/// The bytes of one request: request line, `Host`, `Accept`, and for a body (or any method
/// but GET/HEAD) `Content-Length`, with `Content-Type: application/json` when there is a body.
pub fn format_request(method: &str, path: &str, body: Option<&[u8]>) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if let Some(b) = body {
        head.push_str("Content-Type: application/json\r\n");
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    } else if method != "GET" && method != "HEAD" {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body.unwrap_or_default());
    out
}

/// One response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code (`200`, `204`, `404`...).
    pub status: u16,
    /// The reason phrase (`OK`, `Not Found`), possibly empty.
    pub reason: String,
    /// The header fields in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The value of the header `name` (case-insensitive), the first if repeated.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body).map_err(|e| {
            Error::Vmm(format!(
                "HTTP {}: the body is not JSON ({e}): {:.200}",
                self.status,
                self.text()
            ))
        })
    }

    /// The message of an error body `{"error":"message"}`, else the body's text.
    pub fn error_message(&self) -> String {
        match serde_json::from_slice::<Value>(&self.body) {
            Ok(v) => match v.get("error").and_then(Value::as_str) {
                Some(m) => m.to_string(),
                None => v.to_string(),
            },
            Err(_) => self.text().trim().to_string(),
        }
    }

    /// `{status} {reason}`, e.g. `404 Not Found`.
    pub fn status_line(&self) -> String {
        if self.reason.is_empty() {
            self.status.to_string()
        } else {
            format!("{} {}", self.status, self.reason)
        }
    }
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::Vmm(format!("HTTP: {what}"))
}

/// Reads one line ending in LF (CR LF or LF), without the line end; `None` at end of stream.
fn read_line(r: &mut impl BufRead, limit: &mut usize) -> Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r
        .by_ref()
        .take(*limit as u64 + 1)
        .read_until(b'\n', &mut buf)
        .map_err(|e| bad(format!("read: {e}")))?;
    if n == 0 {
        return Ok(None);
    }
    if n > *limit {
        return Err(bad(format!("response head longer than {MAX_HEAD} bytes")));
    }
    *limit -= n;
    if buf.last() != Some(&b'\n') {
        return Err(bad(format!(
            "connection closed inside a line: {:?}",
            String::from_utf8_lossy(&buf)
        )));
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|e| bad(format!("a line is not UTF-8: {e}")))
}

fn read_exact(r: &mut impl Read, n: usize, what: &str) -> Result<Vec<u8>> {
    let mut body = vec![0; n];
    r.read_exact(&mut body)
        .map_err(|e| bad(format!("reading {what} of {n} bytes: {e}")))?;
    Ok(body)
}

/// Reads one response from `r`: status line, header fields, and the body (`Content-Length`,
/// chunked, none for 1xx/204/304 and HEAD, else up to the end of the stream). Empty lines
/// before the status line are skipped.
pub fn read_response(r: &mut impl BufRead, method: &str) -> Result<Response> {
    let mut limit = MAX_HEAD;
    let status_line = loop {
        match read_line(r, &mut limit)? {
            None => return Err(bad("connection closed before a response")),
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(bad(format!("not an HTTP/1.x status line: {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..1000).contains(s))
        .ok_or_else(|| bad(format!("no status code in {status_line:?}")))?;
    let reason = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let line = read_line(r, &mut limit)?.ok_or_else(|| bad("connection closed inside the header"))?;
        if line.is_empty() {
            break;
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("not a header field: {line:?}")))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut resp = Response {
        status,
        reason,
        headers,
        body: Vec::new(),
    };
    if (100..200).contains(&status) || status == 204 || status == 304 || method == "HEAD" {
        return Ok(resp);
    }
    let chunked = resp
        .header("Transfer-Encoding")
        .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            let line = read_line(r, &mut limit)?.ok_or_else(|| bad("connection closed inside a chunked body"))?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16).map_err(|_| bad(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailer fields up to the empty line.
                while read_line(r, &mut limit)?.is_some_and(|l| !l.is_empty()) {}
                break;
            }
            resp.body.extend(read_exact(r, size, "a chunk")?);
            read_line(r, &mut limit)?;
        }
    } else if let Some(len) = resp.header("Content-Length") {
        let len: usize = len.parse().map_err(|_| bad(format!("bad Content-Length {len:?}")))?;
        resp.body = read_exact(r, len, "the body")?;
    } else {
        r.read_to_end(&mut resp.body)
            .map_err(|e| bad(format!("reading the body: {e}")))?;
    }
    Ok(resp)
}

/// A keep-alive connection: requests go out on `writer`, responses come from `reader`
/// (two handles on one stream, or the two ends of a relay).
pub struct Client<S: Read + Write> {
    reader: BufReader<S>,
    writer: S,
}

impl Client<UnixStream> {
    /// Connects to the Unix socket at `path`.
    pub fn connect(path: &Path) -> Result<Self> {
        let s = UnixStream::connect(path).map_err(|e| Error::Vmm(format!("connecting {}: {e}", path.display())))?;
        Self::over(s)
    }

    /// A client over a connected stream.
    pub fn over(stream: UnixStream) -> Result<Self> {
        let reader = stream
            .try_clone()
            .map_err(|e| Error::Vmm(format!("cloning the API socket: {e}")))?;
        Ok(Client::new(reader, stream))
    }
}

impl<S: Read + Write> Client<S> {
    /// A client reading from `reader` and writing to `writer`.
    pub fn new(reader: S, writer: S) -> Self {
        Client {
            reader: BufReader::new(reader),
            writer,
        }
    }

    /// Sends one request and reads its response, whatever its status.
    pub fn request(&mut self, method: &str, path: &str, body: Option<&Value>) -> Result<Response> {
        let body = body.map(|b| b.to_string().into_bytes());
        let bytes = format_request(method, path, body.as_deref());
        self.writer
            .write_all(&bytes)
            .and_then(|_| self.writer.flush())
            .map_err(|e| Error::Vmm(format!("{method} {path}: write: {e}")))?;
        read_response(&mut self.reader, method).map_err(|e| Error::Vmm(format!("{method} {path}: {e}")))
    }

    /// Sends one request; a status other than 2xx is an error naming the request, the
    /// status and the API's message (`PUT /api/v1/memory/vmem9: 404 Not Found: no device`).
    pub fn call(&mut self, method: &str, path: &str, body: Option<&Value>) -> Result<Response> {
        let resp = self.request(method, path, body)?;
        if resp.is_success() {
            Ok(resp)
        } else {
            Err(Error::Vmm(format!(
                "{method} {path}: {}: {}",
                resp.status_line(),
                resp.error_message()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    /// A canned server: each read returns the next piece (so a response can be split
    /// anywhere); writes are collected.
    #[derive(Clone, Default)]
    struct Pieces {
        input: Arc<Mutex<VecDeque<Vec<u8>>>>,
        output: Arc<Mutex<Vec<u8>>>,
    }

    impl Pieces {
        fn new(pieces: &[&[u8]]) -> Self {
            let p = Pieces::default();
            p.input.lock().unwrap().extend(pieces.iter().map(|b| b.to_vec()));
            p
        }
        fn sent(&self) -> String {
            String::from_utf8(self.output.lock().unwrap().clone()).unwrap()
        }
    }

    impl Read for Pieces {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let mut input = self.input.lock().unwrap();
            let Some(mut piece) = input.pop_front() else {
                return Ok(0);
            };
            let n = piece.len().min(buf.len());
            buf[..n].copy_from_slice(&piece[..n]);
            if n < piece.len() {
                input.push_front(piece.split_off(n));
            }
            Ok(n)
        }
    }

    impl Write for Pieces {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn requests_are_formatted() {
        assert_eq!(
            String::from_utf8(format_request("GET", "/api/v1/vm", None)).unwrap(),
            "GET /api/v1/vm HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"
        );
        let body = br#"{"requested_size":268435456}"#;
        assert_eq!(
            String::from_utf8(format_request("PUT", "/api/v1/memory/vmem0", Some(body))).unwrap(),
            "PUT /api/v1/memory/vmem0 HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: 28\r\n\r\n{\"requested_size\":268435456}"
        );
        assert_eq!(
            String::from_utf8(format_request("PUT", "/api/v1/vmm/shutdown", None)).unwrap(),
            "PUT /api/v1/vmm/shutdown HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Length: 0\r\n\r\n"
        );
    }

    #[test]
    fn a_response_split_across_reads_parses() {
        let body = r#"{"state":"running","uptime_ms":12345678}"#;
        let text = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}\
             HTTP/1.1 204 No Content\r\n\r\n",
            body.len()
        );
        let text = text.as_bytes();
        // Split at every place: in the status line, a header, between head and body, the body.
        for cut in [1, 9, 17, 40, 70, 75, 90, 100] {
            let (a, b) = text.split_at(cut);
            let (b, c) = b.split_at(7.min(b.len()));
            let mut r = BufReader::new(Pieces::new(&[a, b, c]));
            let resp = read_response(&mut r, "GET").unwrap();
            assert_eq!((resp.status, resp.reason.as_str()), (200, "OK"), "cut at {cut}");
            assert_eq!(resp.header("content-length"), Some("40"));
            assert_eq!(resp.json().unwrap(), json!({"state": "running", "uptime_ms": 12345678}));
            // The next response on the same connection starts right after the body.
            let next = read_response(&mut r, "PUT").unwrap();
            assert_eq!((next.status, next.body.len()), (204, 0), "cut at {cut}");
        }
        // One byte per read.
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        let resp = read_response(&mut BufReader::new(Pieces::new(&bytes)), "GET").unwrap();
        assert_eq!(resp.body, body.as_bytes());
    }

    #[test]
    fn error_statuses_carry_the_json_message() {
        let server = Pieces::new(&[
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 29\r\n\r\n",
            b"{\"error\":\"no device `vmem9`\"}",
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 9\r\n\r\nnot json!",
        ]);
        let mut c = Client::new(server.clone(), server.clone());
        let body = json!({"requested_size": 1u64 << 30});
        let e = c
            .call("PUT", "/api/v1/memory/vmem9", Some(&body))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "vmm: PUT /api/v1/memory/vmem9: 404 Not Found: no device `vmem9`");
        let r = c.request("PUT", "/api/v1/memory/vmem0", Some(&body)).unwrap();
        assert_eq!((r.status, r.error_message().as_str()), (400, "not json!"));
        assert!(!r.is_success());
        assert!(r.json().unwrap_err().to_string().contains("not JSON"));
        assert_eq!(
            server.sent(),
            "PUT /api/v1/memory/vmem9 HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: 29\r\n\r\n{\"requested_size\":1073741824}\
             PUT /api/v1/memory/vmem0 HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: 29\r\n\r\n{\"requested_size\":1073741824}"
        );
    }

    #[test]
    fn chunked_and_close_delimited_bodies_and_bad_responses() {
        let text: &[u8] =
            b"\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n\
                            HTTP/1.0 200 OK\r\n\r\n{\"b\":2}";
        let mut r = BufReader::new(Pieces::new(&[text]));
        assert_eq!(read_response(&mut r, "GET").unwrap().json().unwrap(), json!({"a": 1}));
        assert_eq!(read_response(&mut r, "GET").unwrap().json().unwrap(), json!({"b": 2}));
        let err = |t: &[u8]| {
            read_response(&mut BufReader::new(Pieces::new(&[t])), "GET")
                .unwrap_err()
                .to_string()
        };
        assert!(err(b"").contains("closed before a response"));
        assert!(err(b"SSH-2.0-x\r\n").contains("not an HTTP/1.x status line: \"SSH-2.0-x\""));
        assert!(err(b"HTTP/1.1 OK\r\n\r\n").contains("no status code"));
        assert!(err(b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n").contains("bad Content-Length \"ten\""));
        assert!(err(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort").contains("reading the body of 10 bytes"));
        assert!(err(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n").contains("not a header field"));
        assert!(err(b"HTTP/1.1 200 OK\r\nX: 1").contains("closed inside a line"));
    }
}

//! A relay for one migration stream between two Unix sockets that breaks it on purpose:
//! `memvisor lab proxy` in L1 for the `live-migrate-corrupt` scenario, and the API tests'
//! faulty link. The source connects to the proxy's socket; the proxy connects to the
//! destination's. What the destination sends back is relayed untouched.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// What the proxy does to the source's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Nothing: a plain relay.
    None,
    /// Flips one bit (0x10) of the byte at this offset of the stream.
    Flip(u64),
    /// Closes both connections once this many bytes went through.
    Cut(u64),
}

impl std::str::FromStr for Fault {
    type Err = String;

    /// `none`, `flip:OFFSET` or `cut:OFFSET` (bytes from the stream's start).
    fn from_str(s: &str) -> Result<Self, String> {
        let offset = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("`{v}` in fault `{s}` is not a byte offset"))
        };
        match s.split_once(':') {
            None if s == "none" => Ok(Fault::None),
            Some(("flip", v)) => offset(v).map(Fault::Flip),
            Some(("cut", v)) => offset(v).map(Fault::Cut),
            _ => Err(format!("fault `{s}`: expected none, flip:OFFSET or cut:OFFSET")),
        }
    }
}

/// A bound proxy socket, not yet relaying.
#[derive(Debug)]
pub struct Proxy {
    listener: UnixListener,
    path: PathBuf,
    target: PathBuf,
    fault: Fault,
}

impl Proxy {
    /// Binds `listen` (an existing socket file there is replaced) for a relay to the Unix
    /// socket `target`, which need not exist until a source connects.
    pub fn bind(listen: &Path, target: &Path, fault: Fault) -> std::io::Result<Self> {
        match std::fs::remove_file(listen) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(Proxy {
            listener: UnixListener::bind(listen)?,
            path: listen.to_path_buf(),
            target: target.to_path_buf(),
            fault,
        })
    }

    /// The socket the source connects to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Relays one connection: accepts the source, connects to the target, and copies both
    /// ways (breaking the source's stream as told) until either side ends. Returns how
    /// many bytes of the source's stream went through.
    pub fn relay_one(self) -> std::io::Result<u64> {
        let (from_source, _) = self.listener.accept()?;
        let to_destination = UnixStream::connect(&self.target)?;
        let (mut back_in, mut back_out) = (to_destination.try_clone()?, from_source.try_clone()?);
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_in, &mut back_out);
            // The destination is gone: so is the source's way to it.
            let _ = back_out.shutdown(Shutdown::Both);
        });
        let sent = forward(from_source, to_destination, self.fault);
        let _ = back.join();
        let _ = std::fs::remove_file(&self.path);
        Ok(sent)
    }
}

/// Copies `input` to `output` applying `fault`; returns the bytes that went through.
fn forward(mut input: UnixStream, mut output: UnixStream, fault: Fault) -> u64 {
    let mut offset = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    let end = |input: &UnixStream, output: &UnixStream| {
        let _ = output.shutdown(Shutdown::Both);
        let _ = input.shutdown(Shutdown::Both);
    };
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        let range = offset..offset + n as u64;
        match fault {
            Fault::Flip(at) if range.contains(&at) => chunk[(at - offset) as usize] ^= 0x10,
            Fault::Cut(at) if range.end >= at => {
                let keep = (at - offset) as usize;
                let _ = output.write_all(&chunk[..keep]);
                end(&input, &output);
                return offset + keep as u64;
            }
            _ => {}
        }
        if output.write_all(chunk).is_err() {
            break;
        }
        offset = range.end;
    }
    end(&input, &output);
    offset
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_name_a_bad_value() {
        assert_eq!("none".parse(), Ok(Fault::None));
        assert_eq!("flip:33554432".parse(), Ok(Fault::Flip(32 << 20)));
        assert_eq!("cut:0".parse(), Ok(Fault::Cut(0)));
        let e = "flip:lots".parse::<Fault>().unwrap_err();
        assert!(e.contains("`lots`"), "{e}");
        assert!("twist:3".parse::<Fault>().unwrap_err().contains("twist:3"));
    }

    /// Runs `fault` over a stream of `len` bytes (byte i = i mod 251) and returns what the
    /// target received.
    fn through(fault: Fault, len: usize) -> Vec<u8> {
        let dir = std::env::temp_dir().join(format!("memvisor-proxy-{}-{fault:?}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = UnixListener::bind(dir.join("target")).unwrap();
        let proxy = Proxy::bind(&dir.join("proxy"), &dir.join("target"), fault).unwrap();
        let listen = proxy.path().to_path_buf();
        let relay = std::thread::spawn(move || proxy.relay_one().unwrap());
        let mut source = UnixStream::connect(&listen).unwrap();
        let (mut received, _) = target.accept().unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let writer = std::thread::spawn(move || {
            let _ = source.write_all(&data);
        });
        let mut got = Vec::new();
        received.read_to_end(&mut got).unwrap();
        drop(received);
        writer.join().unwrap();
        let sent = relay.join().unwrap();
        assert_eq!(sent, got.len() as u64);
        std::fs::remove_dir_all(&dir).unwrap();
        got
    }

    #[test]
    fn a_flip_changes_exactly_one_byte_and_a_cut_ends_the_stream_there() {
        let len = 300_000;
        let plain: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        assert_eq!(through(Fault::None, len), plain);
        let flipped = through(Fault::Flip(200_001), len);
        let differ: Vec<usize> = (0..len).filter(|&i| flipped[i] != plain[i]).collect();
        assert_eq!(differ, vec![200_001]);
        assert_eq!(flipped[200_001], plain[200_001] ^ 0x10);
        assert_eq!(through(Fault::Cut(70_000), len), plain[..70_000].to_vec());
    }
}

//! The client socket as fe2o3's acceptor sees it, plus two things fe2o3 does not offer:
//!
//! - the AMQP `open` hostname (the namespace the client means; fe2o3 keeps the remote `open`
//!   to itself), read by watching the incoming bytes until the `open` frame has gone by;
//! - a kill switch that makes every further read and write fail, so the connection engine stops
//!   and drops the socket without a `close` frame: what a network failure looks like.
//!
//! And the SASL side: ANONYMOUS (what the Azure SDKs use) and PLAIN with any credentials.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use fe2o3_amqp::acceptor::sasl_acceptor::{SaslAcceptor, SaslServerFrame};
use fe2o3_amqp_types::performatives::Open;
use fe2o3_amqp_types::primitives::{Array, Symbol};
use fe2o3_amqp_types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::store::lock;

/// Stops a connection's socket from the outside.
#[derive(Default)]
pub(crate) struct KillSwitch {
    killed: AtomicBool,
    /// The last read and write wakers, woken on kill so a parked engine notices.
    wakers: Mutex<[Option<Waker>; 2]>,
}

impl fmt::Debug for KillSwitch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KillSwitch").field("killed", &self.is_killed()).finish()
    }
}

const READ: usize = 0;
const WRITE: usize = 1;

impl KillSwitch {
    pub fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        for waker in lock(&self.wakers).iter_mut().filter_map(Option::take) {
            waker.wake();
        }
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    /// Remembers the waker, then reports whether the switch was thrown (in that order, so a
    /// kill between the two is not missed).
    fn park(&self, slot: usize, waker: &Waker) -> bool {
        let mut wakers = lock(&self.wakers);
        if !wakers[slot].as_ref().is_some_and(|w| w.will_wake(waker)) {
            wakers[slot] = Some(waker.clone());
        }
        drop(wakers);
        self.is_killed()
    }
}

fn killed() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "connection dropped by the stand-in")
}

/// A client connection's socket.
pub(crate) struct ClientStream {
    inner: TcpStream,
    kill: Arc<KillSwitch>,
    sniffer: OpenSniffer,
}

impl fmt::Debug for ClientStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientStream").field("inner", &self.inner).field("kill", &self.kill).finish()
    }
}

impl ClientStream {
    /// `hostname` receives the `open` frame's hostname (`None` inside if the client sent none).
    pub fn new(inner: TcpStream, kill: Arc<KillSwitch>, hostname: Arc<Mutex<Option<String>>>) -> Self {
        ClientStream { inner, kill, sniffer: OpenSniffer { buffer: Vec::new(), done: false, hostname } }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.kill.park(READ, cx.waker()) {
            return Poll::Ready(Err(killed()));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &result {
            this.sniffer.feed(&buf.filled()[before..]);
        }
        result
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.kill.park(WRITE, cx.waker()) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.kill.park(WRITE, cx.waker()) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Watches the client's first bytes for the AMQP `open` frame.
struct OpenSniffer {
    buffer: Vec<u8>,
    done: bool,
    hostname: Arc<Mutex<Option<String>>>,
}

/// Give up looking after this much (SASL exchanges are a few hundred bytes).
const SNIFF_LIMIT: usize = 64 * 1024;

impl OpenSniffer {
    fn feed(&mut self, bytes: &[u8]) {
        if self.done {
            return;
        }
        self.buffer.extend_from_slice(bytes);
        loop {
            // Protocol headers: `AMQP` + id + version (SASL first, then AMQP).
            if self.buffer.len() >= 4 && &self.buffer[..4] == b"AMQP" {
                if self.buffer.len() < 8 {
                    return;
                }
                self.buffer.drain(..8);
                continue;
            }
            if self.buffer.len() < 8 {
                return;
            }
            let size =
                u32::from_be_bytes([self.buffer[0], self.buffer[1], self.buffer[2], self.buffer[3]]) as usize;
            if !(8..=SNIFF_LIMIT).contains(&size) {
                return self.finish(None);
            }
            if self.buffer.len() < size {
                if self.buffer.len() > SNIFF_LIMIT {
                    self.finish(None);
                }
                return;
            }
            let data_offset = usize::from(self.buffer[4]) * 4;
            let frame_type = self.buffer[5];
            // Type 0 is an AMQP frame; its first one with a body must be the `open`.
            if frame_type == 0 && (8..size).contains(&data_offset) {
                let open: Option<Open> = serde_amqp::from_slice(&self.buffer[data_offset..size]).ok();
                return self.finish(open.and_then(|o| o.hostname));
            }
            // SASL frames and empty (heartbeat) frames.
            self.buffer.drain(..size);
        }
    }

    fn finish(&mut self, hostname: Option<String>) {
        *lock(&self.hostname) = hostname;
        self.done = true;
        self.buffer = Vec::new();
    }
}

/// SASL: ANONYMOUS, and PLAIN with any user name and password (old Service Bus clients send
/// a key name and key that way; the stand-in authorizes with CBS tokens only).
#[derive(Debug, Clone, Default)]
pub(crate) struct AnonymousOrPlain;

impl SaslAcceptor for AnonymousOrPlain {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![Symbol::from("ANONYMOUS"), Symbol::from("PLAIN")])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        let code = match init.mechanism.as_str() {
            "ANONYMOUS" | "PLAIN" => SaslCode::Ok,
            _ => SaslCode::Auth,
        };
        SaslServerFrame::Outcome(SaslOutcome { code, additional_data: None })
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        // Neither mechanism has a challenge, so a response is out of turn.
        SaslServerFrame::Outcome(SaslOutcome { code: SaslCode::Sys, additional_data: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::definitions::Fields;

    fn frame(frame_type: u8, body: &[u8]) -> Vec<u8> {
        let mut frame = ((8 + body.len()) as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&[2, frame_type, 0, 0]);
        frame.extend_from_slice(body);
        frame
    }

    fn sniff(chunks: &[&[u8]]) -> Option<String> {
        let slot = Arc::new(Mutex::new(Some("unset".to_owned())));
        let mut sniffer = OpenSniffer { buffer: Vec::new(), done: false, hostname: slot.clone() };
        for chunk in chunks {
            sniffer.feed(chunk);
        }
        let found = lock(&slot).clone();
        found
    }

    #[test]
    fn finds_the_open_hostname_after_sasl() {
        let open = Open {
            container_id: "c".into(),
            hostname: Some("contoso.servicebus.windows.net".into()),
            max_frame_size: 65536.into(),
            channel_max: 100.into(),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: Some(Fields::default()),
        };
        let mut bytes = b"AMQP\x03\x01\x00\x00".to_vec();
        bytes.extend(frame(1, b"\x00\x53\x41\x45")); // a SASL frame's worth of bytes
        bytes.extend(b"AMQP\x00\x01\x00\x00");
        bytes.extend(frame(0, &[])); // heartbeat
        bytes.extend(frame(0, &serde_amqp::to_vec(&open).unwrap()));
        bytes.extend(b"trailing frames are not looked at");
        // Byte by byte, as a slow network might hand it over.
        let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(sniff(&chunks).as_deref(), Some("contoso.servicebus.windows.net"));
        assert_eq!(sniff(&[&bytes]).as_deref(), Some("contoso.servicebus.windows.net"));

        let anonymous = Open { hostname: None, ..open };
        let mut bytes = b"AMQP\x00\x01\x00\x00".to_vec();
        bytes.extend(frame(0, &serde_amqp::to_vec(&anonymous).unwrap()));
        assert_eq!(sniff(&[&bytes]), None);
        // Garbage ends the search without a hostname.
        assert_eq!(sniff(&[b"\xff\xff\xff\xff\x02\x00\x00\x00"]), None);
        // Not enough bytes yet: nothing decided.
        assert_eq!(sniff(&[b"AMQP"]).as_deref(), Some("unset"));
    }
}

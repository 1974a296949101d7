//! The time limits on reading requests.
//!
//! - **Headers** ([`ConnectionTimer`]): hyper's `header_read_timeout` runs from the moment it
//!   starts waiting for a request's head. On a new connection that is right: a client has
//!   `header_read_timeout` from connecting to send its headers. Between requests of a kept-alive
//!   connection it would also close connections merely idle for that long, and a client posting
//!   every few seconds would regularly send into a connection the server is closing (a request
//!   lost in flight, not retried since a POST is not idempotent). So twinroute gives hyper a
//!   timer of its own, per connection, that tells the two apart: once a connection has served a
//!   request, it may stay idle for `idle_timeout`, and the header limit runs from the first byte
//!   of the next request.
//! - **Bodies** ([`DeadlineBody`]): a request's whole body must arrive within
//!   `body_read_timeout` of its headers, or reading it fails with [`BodyReadTimeout`].

use bytes::Bytes;
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The error a request body gives when it did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {} s (body_read_timeout_seconds)", .0.as_secs())]
pub struct BodyReadTimeout(pub Duration);

/// Whether `error`, or any error it wraps, is a [`BodyReadTimeout`]: how a handler tells a slow
/// client (408) from an oversized body (413).
pub fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<BodyReadTimeout>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// A request body that fails with [`BodyReadTimeout`] once its deadline passes: every body read
/// by any handler is bounded, whether or not the handler thinks of it.
pub(crate) struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
    api: &'static str,
    expired: bool,
}

impl DeadlineBody {
    pub(crate) fn new(inner: Incoming, limit: Duration, api: &'static str) -> Self {
        DeadlineBody { inner, deadline: Box::pin(tokio::time::sleep(limit)), limit, api, expired: false }
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.expired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.expired = true;
            metrics::counter!("twinroute_http_timeouts_total", "api" => self.api, "phase" => "body")
                .increment(1);
            return Poll::Ready(Some(Err(Box::new(BodyReadTimeout(self.limit)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// What one connection has done, shared by its reader ([`Tracked`]), its service and its timer.
pub(crate) struct Activity {
    /// The connection's start: times below are nanoseconds since it.
    origin: Instant,
    /// Requests handed to the router.
    served: AtomicU64,
    /// Set when the timer starts waiting for a head; the next read clears it and notes its time.
    waiting: AtomicBool,
    /// When the first byte after `waiting` was set arrived (`u64::MAX`: none yet).
    first_byte: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            origin: Instant::now(),
            served: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            first_byte: AtomicU64::new(u64::MAX),
        })
    }

    /// A request reached the router.
    pub(crate) fn served(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    fn read(&self) {
        if self.waiting.swap(false, Ordering::AcqRel) {
            let at = Instant::now().saturating_duration_since(self.origin).as_nanos() as u64;
            self.first_byte.store(at, Ordering::Release);
        }
    }

    fn first_byte(&self) -> Option<Instant> {
        match self.first_byte.load(Ordering::Acquire) {
            u64::MAX => None,
            n => Some(self.origin + Duration::from_nanos(n)),
        }
    }
}

/// A connection's stream, noting in [`Activity`] when bytes arrive.
pub(crate) struct Tracked<S> {
    pub(crate) inner: S,
    pub(crate) activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = ready!(Pin::new(&mut self.inner).poll_read(cx, buf));
        if buf.filled().len() > before {
            self.activity.read();
        }
        Poll::Ready(result)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// hyper's timer for one connection. hyper (HTTP/1, server) uses its timer for the header read
/// timeout only: each sleep it asks for is a wait for a request's head.
#[derive(Clone)]
pub(crate) struct ConnectionTimer {
    pub(crate) activity: Arc<Activity>,
    pub(crate) header: Duration,
    pub(crate) idle: Duration,
}

impl hyper::rt::Timer for ConnectionTimer {
    fn sleep(&self, _duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.head_wait())
    }

    fn sleep_until(&self, _deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.head_wait())
    }

    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }
}

impl ConnectionTimer {
    fn head_wait(&self) -> HeadWait {
        let activity = self.activity.clone();
        activity.first_byte.store(u64::MAX, Ordering::Release);
        activity.waiting.store(true, Ordering::Release);
        let start = Instant::now();
        HeadWait {
            fresh: activity.served.load(Ordering::Relaxed) == 0,
            activity,
            start,
            header: self.header,
            idle: self.idle,
            sleep: Box::pin(tokio::time::sleep_until(start + self.header)),
        }
    }
}

/// A wait for a request's head: `header` from the connection's start for its first request;
/// after that, `idle` until a byte comes, then `header` from that byte.
struct HeadWait {
    activity: Arc<Activity>,
    fresh: bool,
    start: Instant,
    header: Duration,
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Future for HeadWait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(self.sleep.as_mut().poll(cx));
            let now = Instant::now();
            let next = if self.fresh {
                return Poll::Ready(());
            } else if let Some(first) = self.activity.first_byte() {
                first + self.header
            } else if now >= self.start + self.idle {
                return Poll::Ready(());
            } else {
                // Still idle: look again when a byte that came now would run out of time.
                (self.start + self.idle).min(now + self.header)
            };
            if now >= next {
                return Poll::Ready(());
            }
            self.sleep.as_mut().reset(next);
        }
    }
}

impl hyper::rt::Sleep for HeadWait {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_timeouts_are_recognised_through_wrappers() {
        let timeout = BodyReadTimeout(Duration::from_secs(3));
        assert!(timeout.to_string().contains("3 s"));
        let wrapped = axum::Error::new(axum::Error::new(BodyReadTimeout(Duration::from_secs(1))));
        assert!(is_body_timeout(&wrapped));
        let other = axum::Error::new(std::io::Error::other("length limit exceeded"));
        assert!(!is_body_timeout(&other));
    }

    fn timer() -> ConnectionTimer {
        ConnectionTimer {
            activity: Activity::new(),
            header: Duration::from_secs(2),
            idle: Duration::from_secs(10),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_has_the_header_limit() {
        let t = timer();
        let start = Instant::now();
        HeadWait::from(&t).await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    impl HeadWait {
        fn from(t: &ConnectionTimer) -> HeadWait {
            t.head_wait()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_request_idle_time_is_allowed_then_the_header_limit_runs_from_the_first_byte() {
        let t = timer();
        t.activity.served();
        let start = Instant::now();
        // Nothing comes: closed at the idle limit.
        HeadWait::from(&t).await;
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        // A byte after 5 s idle: the header limit runs from it.
        let start = Instant::now();
        let wait = HeadWait::from(&t);
        let activity = t.activity.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            activity.read();
        });
        wait.await;
        assert_eq!(start.elapsed(), Duration::from_secs(7));
    }
}

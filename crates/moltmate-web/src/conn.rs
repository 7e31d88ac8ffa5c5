//! What one TCP connection may hold of the web server: a share of the connection cap per client
//! address, and no write that stalls for ever.
//!
//! The server caps open connections (`WebSettings::max_connections`) so a flood cannot run it
//! out of file descriptors. A single cap shared by everyone is itself a target: one address
//! opening idle connections faster than the header timeout closes them would hold every slot,
//! and `/healthz`, the chat, the API and the webhooks would stop answering. So each client
//! address (IPv6 by /64) holds at most an eighth of them (at least 8); a trusted reverse proxy,
//! which carries everyone's connections, and loopback are exempt (the per-IP rate limits still see the real
//! client behind it). A connection over its address's share is closed at once.
//!
//! Only reading has timeouts in hyper (headers) and tower-http (request bodies). A client that
//! stops *reading* a response — a 200 MB download, a streamed answer — would hold its
//! connection, slot and open file for ever. [`StallGuard`] fails a write that has made no
//! progress for [`WRITE_STALL`], which ends the connection.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How long a write may make no progress before the connection is closed.
pub const WRITE_STALL: Duration = Duration::from_secs(60);

/// Open connections per client address.
#[derive(Clone)]
pub struct PerAddress {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    limit: usize,
    exempt: Arc<Vec<IpAddr>>,
}

/// One connection counted against its address; gives the place back when dropped.
pub struct AddressSlot {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    key: Option<IpAddr>,
}

impl PerAddress {
    /// Each address may hold `limit` connections; `exempt` addresses (trusted proxies) any
    /// number.
    pub fn new(limit: usize, exempt: Vec<IpAddr>) -> Self {
        PerAddress {
            open: Arc::new(Mutex::new(HashMap::new())),
            limit: limit.max(1),
            exempt: Arc::new(exempt.iter().map(|ip| ip.to_canonical()).collect()),
        }
    }

    /// The share of one address: an eighth of the whole cap, at least 8.
    pub fn share_of(max_connections: usize) -> usize {
        (max_connections / 8).max(8)
    }

    /// Counts a connection from `peer`, or `None` when that address holds its share already.
    pub fn admit(&self, peer: IpAddr) -> Option<AddressSlot> {
        let peer = peer.to_canonical();
        // Loopback is this machine: the operator, a local reverse proxy, the benchmark.
        if peer.is_loopback() || self.exempt.contains(&peer) {
            return Some(AddressSlot {
                open: Arc::clone(&self.open),
                key: None,
            });
        }
        let key = crate::security::ip_bucket(peer);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(key).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            open: Arc::clone(&self.open),
            key: Some(key),
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&key);
            }
        }
    }
}

/// A stream whose writes fail after [`WRITE_STALL`] (or the given time) without progress.
pub struct StallGuard<S> {
    inner: S,
    stall: Duration,
    since: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> StallGuard<S> {
    pub fn new(inner: S, stall: Duration) -> Self {
        StallGuard {
            inner,
            stall,
            since: None,
        }
    }

    /// After the inner stream said "not now": arms the stall timer if needed and reports
    /// whether it ran out.
    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let stall = self.stall;
        let timer = self
            .since
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        timer.as_mut().poll(cx).is_ready()
    }

    /// What a write or flush of the inner stream answered, with the stall rule applied: "not
    /// now" for longer than the stall time becomes an error; any answer resets the timer.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending if self.stalled(cx) => Poll::Ready(Err(Self::timed_out())),
            Poll::Pending => Poll::Pending,
            ready => {
                self.since = None;
                ready
            }
        }
    }

    fn timed_out() -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "the client read nothing for too long",
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn connection_cap_not_held_by_one_address() {
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let per = PerAddress::new(2, vec![proxy]);
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let first = per.admit(a).unwrap();
        let _second = per.admit(a).unwrap();
        assert!(
            per.admit(a).is_none(),
            "a third from one address is refused"
        );
        assert!(per.admit("192.0.2.8".parse().unwrap()).is_some());
        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let _x = per.admit(v6a).unwrap();
        let _y = per.admit(v6b).unwrap();
        assert!(per.admit(v6a).is_none(), "one /64 is one address");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert!(per.admit(mapped).is_none(), "a mapped spelling is the same");
        drop(first);
        assert!(
            per.admit(a).is_some(),
            "a closed connection gives its place back"
        );
        for _ in 0..100 {
            std::mem::forget(per.admit(proxy).unwrap());
        }
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_cut_off() {
        // A pipe whose reader never reads: writes stop once its buffer is full.
        let (client, _server_keeps_it_open) = tokio::io::duplex(1024);
        let mut guarded = StallGuard::new(client, Duration::from_millis(200));
        let started = tokio::time::Instant::now();
        let mut written = 0usize;
        let error = loop {
            match guarded.write(&[0u8; 512]).await {
                Ok(n) => written += n,
                Err(e) => break e,
            }
        };
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(written, 1024);
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
}

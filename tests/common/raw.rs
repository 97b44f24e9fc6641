//! A connection that speaks raw frames: for bad-input tests, and for
//! seeing exactly which frames a server sends.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use stampede_protocol::message::{Hello, Reply, Request};
use stampede_protocol::{FrameCodec, Status};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

/// A connection that speaks raw frames, for bad-input tests.
pub struct RawConn {
    pub write: tokio::net::tcp::OwnedWriteHalf,
    pub read: FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
}

impl RawConn {
    pub async fn connect(addr: &str) -> RawConn {
        let (read, write) = TcpStream::connect(addr).await.unwrap().into_split();
        RawConn { write, read: FramedRead::new(read, FrameCodec::new()) }
    }

    pub async fn authed(addr: &str, token: &str) -> RawConn {
        let mut conn = RawConn::connect(addr).await;
        conn.send(1, Request::Hello(Hello { token: Bytes::copy_from_slice(token.as_bytes()) })).await;
        assert!(matches!(conn.next().await, Some((1, Reply::Hello(h))) if h.status == Status::Ok));
        conn
    }

    pub async fn send(&mut self, request_id: u64, request: Request) {
        let mut buf = BytesMut::new();
        request.encode_frame(request_id, &mut buf);
        self.write.write_all(&buf).await.unwrap();
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        // The server may already have closed; that is fine for these tests.
        let _ = self.write.write_all(bytes).await;
    }

    pub async fn next(&mut self) -> Option<(u64, Reply)> {
        let frame =
            tokio::time::timeout(Duration::from_secs(10), self.read.next()).await.expect("reply within 10 s")?;
        let frame = frame.ok()?;
        Some((frame.request_id, Reply::decode(&frame).expect("server replies are well formed")))
    }

    pub async fn error_status(&mut self) -> Option<(u64, Status)> {
        match self.next().await? {
            (id, Reply::Error(e)) => Some((id, e.status)),
            other => panic!("expected an ERROR reply, got {other:?}"),
        }
    }
}

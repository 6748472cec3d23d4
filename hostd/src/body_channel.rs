//! An HTTP body fed by a channel: how hostd streams a file out of a guest to the admin
//! socket's client, and how the CLI streams a local file in, without holding either whole.
//! The sender ends the body by dropping its end; an `Err` sent aborts it, so the peer sees
//! a cut transfer (its length short of `Content-Length`) rather than a complete-looking one.

use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::body::{Body, Bytes, Frame};
use tokio::sync::mpsc;

/// Chunks in flight between the producer and the connection.
pub const DEPTH: usize = 8;

/// The receiving end, as a body.
#[derive(Debug)]
pub struct ChannelBody(mpsc::Receiver<Result<Bytes, std::io::Error>>);

/// A body and the sender that feeds it.
pub fn channel() -> (mpsc::Sender<Result<Bytes, std::io::Error>>, ChannelBody) {
    let (tx, rx) = mpsc::channel(DEPTH);
    (tx, ChannelBody(rx))
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|r| r.map(Frame::data)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn chunks_arrive_in_order_and_the_body_ends_when_the_sender_goes() {
        let (tx, body) = channel();
        tokio::spawn(async move {
            for part in ["one ", "two"] {
                tx.send(Ok(Bytes::from(part))).await.unwrap();
            }
        });

        let got = body.collect().await.unwrap().to_bytes();

        assert_eq!(&got[..], b"one two");
    }

    #[tokio::test]
    async fn an_error_sent_aborts_the_body() {
        let (tx, body) = channel();
        tx.send(Ok(Bytes::from("part"))).await.unwrap();
        tx.send(Err(std::io::Error::other("guest went away")))
            .await
            .unwrap();
        drop(tx);

        let err = body.collect().await.unwrap_err();

        assert_eq!(err.to_string(), "guest went away");
    }
}

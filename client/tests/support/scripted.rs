//! A scripted stream server for viewer tests: it admits one viewer with the rights it was
//! given (any token), hands the test every control message the viewer sends and sends the
//! control messages and frames the test gives it.

use std::sync::Arc;
use std::time::Duration;

use hostd::stream::Identity;
use proto::stream::{
    self as wire, ClientMessage, Codec, FrameHeader, Message, MessageReader, Rights, ServerMessage,
    StreamConfig,
};
use tokio::sync::mpsc;

/// The stream configuration the scripted server announces.
pub const CONFIG: StreamConfig = StreamConfig {
    width: 1280,
    height: 720,
    fps_milli: 30_000,
    codec: Codec::H264AnnexB,
    bitrate_bps: 2_000_000,
};

pub struct ScriptedServer {
    /// The connect URL (genos://127.0.0.1:PORT/dev?token=..&cert=..).
    pub url: String,
    received: mpsc::UnboundedReceiver<ClientMessage>,
    to_viewer: mpsc::UnboundedSender<Out>,
    _endpoint: quinn::Endpoint,
}

impl ScriptedServer {
    /// Listens on 127.0.0.1; the first viewer is welcomed with `rights` and [`CONFIG`].
    /// Must be called within a tokio runtime.
    pub fn start(rights: Rights) -> Self {
        let identity = Identity::generate(&[]).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![identity.cert.clone()], identity.private_key())
            .unwrap();
        tls.alpn_protocols = vec![wire::ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
        let endpoint = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let url = hostd::stream::connect_url(addr, "dev", "scripted", &identity.fingerprint);
        let (received_tx, received) = mpsc::unbounded_channel();
        let (to_viewer, outgoing) = mpsc::unbounded_channel();
        tokio::spawn(serve_one(endpoint.clone(), rights, received_tx, outgoing));
        Self {
            url,
            received,
            to_viewer,
            _endpoint: endpoint,
        }
    }

    /// Sends `msg` to the viewer (queued until it connected).
    pub fn send(&self, msg: ServerMessage) {
        self.to_viewer.send(Out::Control(msg)).unwrap();
    }

    /// Sends one H.264 access unit `data` of a `width` x `height` picture on its own stream.
    pub fn send_frame(
        &self,
        sequence: u64,
        keyframe: bool,
        width: u16,
        height: u16,
        data: Vec<u8>,
    ) {
        let header = FrameHeader {
            sequence,
            capture_time_us: 0,
            keyframe,
            codec: Codec::H264AnnexB,
            width,
            height,
            payload_len: data.len() as u32,
        };
        self.to_viewer.send(Out::Frame(header, data)).unwrap();
    }

    /// The next message from the viewer that `pick` takes, skipping the others; fails the
    /// test naming `what` when none comes within `secs`.
    pub async fn next<T>(
        &mut self,
        secs: u64,
        what: &str,
        mut pick: impl FnMut(ClientMessage) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let msg = tokio::time::timeout_at(deadline, self.received.recv())
                .await
                .unwrap_or_else(|_| panic!("no {what} from the viewer within {secs} s"))
                .unwrap_or_else(|| panic!("the viewer left before sending {what}"));
            if let Some(taken) = pick(msg) {
                return taken;
            }
        }
    }

    /// Every message the viewer sends within `time` that `pick` takes.
    pub async fn collect<T>(
        &mut self,
        time: Duration,
        mut pick: impl FnMut(ClientMessage) -> Option<T>,
    ) -> Vec<T> {
        let deadline = tokio::time::Instant::now() + time;
        let mut taken = Vec::new();
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, self.received.recv()).await {
            taken.extend(pick(msg));
        }
        taken
    }
}

/// What the test has the server send.
enum Out {
    Control(ServerMessage),
    Frame(FrameHeader, Vec<u8>),
}

async fn serve_one(
    endpoint: quinn::Endpoint,
    rights: Rights,
    received: mpsc::UnboundedSender<ClientMessage>,
    mut outgoing: mpsc::UnboundedReceiver<Out>,
) {
    let Some(incoming) = endpoint.accept().await else {
        return;
    };
    let Ok(conn) = incoming.await else { return };
    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let mut reader = MessageReader::new();
    let mut welcomed = false;
    loop {
        tokio::select! {
            chunk = recv.read_chunk(64 * 1024, true) => {
                let Ok(Some(chunk)) = chunk else { return };
                reader.push(&chunk.bytes);
                while let Some(msg) = reader.next_message::<ClientMessage>().unwrap() {
                    if matches!(msg, ClientMessage::Hello { .. }) && !welcomed {
                        welcomed = true;
                        let welcome = ServerMessage::Welcome {
                            version: wire::VERSION,
                            session_id: [7; 16],
                            rights,
                            resumed: false,
                            resume_grace_ms: 0,
                            config: CONFIG,
                        };
                        if send.write_all(&welcome.to_bytes()).await.is_err() {
                            return;
                        }
                    }
                    let _ = received.send(msg);
                }
            }
            msg = outgoing.recv(), if welcomed => {
                match msg {
                    None => return,
                    Some(Out::Control(msg)) => {
                        if send.write_all(&msg.to_bytes()).await.is_err() {
                            return;
                        }
                    }
                    Some(Out::Frame(header, data)) => {
                        let Ok(mut uni) = conn.open_uni().await else { return };
                        let sent = async {
                            uni.write_all(&header.encode()).await?;
                            uni.write_all(&data).await?;
                            uni.finish()?;
                            Ok::<_, Box<dyn std::error::Error>>(())
                        };
                        if sent.await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

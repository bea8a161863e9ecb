//! The line framing over a real loopback socket: any byte stream yields lines no longer than the
//! cap, then a clean end, a truncation or a refusal; never a panic or unbounded buffering.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal::connection::{Connection, Limits};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const LIMITS: Limits =
    Limits { max_frame: 256, idle_timeout: Duration::from_secs(5), frame_timeout: Duration::from_secs(5) };

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let bytes = data.to_vec();
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&bytes).await;
            let _ = client.shutdown().await;
        });
        let mut conn = Connection::new(server, LIMITS).unwrap();
        let mut total = 0;
        while let Ok(Some(line)) = conn.read_line().await {
            assert!(line.len() <= LIMITS.max_frame && !line.contains(&b'\n'));
            total += line.len() + 1;
        }
        assert!(total <= data.len());
        drop(conn);
        let _ = writer.await;
    });
});

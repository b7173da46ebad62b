//! Prometheus metrics (`GET /metrics`) and health (`GET /healthz`) over plain HTTP/1.1 on
//! `ImageCache.MetricsAddr`. One request per connection; anything else gets 404 or 405.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use crate::background::Background;
use crate::cache::Cache;
use crate::metrics::Metrics;

/// Binds `addr` (at start, so that an address in use stops cimaged with an error, as the
/// socket does).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot bind ImageCache.MetricsAddr {addr}: {e}"),
        )
    })
}

/// Serves metrics and health on `listener` until shutdown begins; connections are tracked tasks
/// of `background`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    cache: Arc<Cache>,
    background: Background,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /metrics and /healthz");
    }
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => r?,
            _ = background.shutting_down() => return Ok(()),
        };
        let (m, c) = (Arc::clone(&metrics), Arc::clone(&cache));
        background.spawn(async move {
            if let Err(e) = handle(stream, m, c).await {
                warn!("metrics connection: {e}");
            }
        });
    }
}

async fn handle(mut s: TcpStream, metrics: Arc<Metrics>, cache: Arc<Cache>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    let head_end = loop {
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf[n..])).await;
        let k = match read {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        if k == 0 {
            return Ok(());
        }
        n += k;
        if let Some(i) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if n == buf.len() {
            return respond(&mut s, 431, "text/plain", "request header too large\n").await;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return respond(&mut s, 405, "text/plain", "only GET is served here\n").await;
    }
    match path {
        "/metrics" => {
            cache.update_gauges().await;
            let body = metrics.render();
            respond(&mut s, 200, "text/plain; version=0.0.4", &body).await
        }
        "/healthz" => {
            let runtime = cache.runtime().image_fs_info().await;
            let index = cache.list().await;
            let body = format!(
                "runtime: {}\nindex: {}\n",
                match &runtime {
                    Ok(_) => "ok".to_string(),
                    Err(e) => format!("failing: {e}"),
                },
                match &index {
                    Ok(l) => format!("ok ({} images)", l.len()),
                    Err(e) => format!("failing: {e}"),
                }
            );
            let code = if runtime.is_ok() && index.is_ok() {
                200
            } else {
                503
            };
            respond(&mut s, code, "text/plain", &body).await
        }
        _ => respond(&mut s, 404, "text/plain", "try /metrics or /healthz\n").await,
    }
}

async fn respond(s: &mut TcpStream, code: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}

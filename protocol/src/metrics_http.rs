//! The HTTP endpoint of a stampede process's metrics and health (the
//! server's `--metrics-listen`, the reconciler's too):
//!
//! - `GET /metrics`: the registry in the Prometheus/OpenMetrics text format;
//! - `GET /healthz`: 200 while the process runs (liveness);
//! - `GET /readyz`: 200 while `ready` is set, 503 otherwise (readiness).
//!
//! HTTP/1 only (hyper), one task per scrape connection; nothing here is on
//! a request path.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::registry::Registry;

/// Serve /metrics, /healthz and /readyz on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>, ready: Arc<AtomicBool>) {
    loop {
        let Ok((stream, _peer)) = listener.accept().await else { continue };
        let (registry, ready) = (registry.clone(), ready.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                let (registry, ready) = (registry.clone(), ready.clone());
                async move { Ok::<_, Infallible>(respond(&request, &registry, &ready)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}

fn respond(request: &Request<hyper::body::Incoming>, registry: &Registry, ready: &AtomicBool) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(body)))
            .expect("valid response")
    };
    match (request.method(), request.uri().path()) {
        (&hyper::Method::GET, "/metrics") => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => Response::builder()
                    .header("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")
                    .body(Full::new(Bytes::from(body)))
                    .expect("valid response"),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n")),
            }
        }
        (&hyper::Method::GET, "/healthz") => text(StatusCode::OK, "alive\n".into()),
        (&hyper::Method::GET, "/readyz") if ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n".into()),
        (&hyper::Method::GET, "/readyz") => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
        _ => text(StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n".into()),
    }
}

/// Bind `addr` and serve `registry` there in the background; the bound
/// address (port 0 picks one).
pub async fn start(addr: &str, registry: Registry, ready: Arc<AtomicBool>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve(listener, Arc::new(registry), ready));
    Ok(bound)
}

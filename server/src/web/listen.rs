//! The HTTP accept loop. `axum::serve` cannot bound how long a client takes to send its request
//! headers (a slowloris client holds a connection open forever), so connections are served here
//! with hyper-util's auto (HTTP/1 + HTTP/2) builder and a header read timeout. The router is read
//! from a watch channel for every request: the port opens with a router that answers "starting"
//! (503 on `/readyz`) while the model loads, then the full app replaces it. Each request carries
//! the peer's address as axum's `ConnectInfo`.

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

/// Serves `listener` until `stop` turns true, then waits up to `grace` for open requests to end.
pub async fn serve(
    listener: TcpListener,
    app: watch::Receiver<Router>,
    header_read_timeout: Duration,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // out of file descriptors and the like: wait instead of spinning
                    eprintln!("[web] accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            // (the Ref that wait_for returns is not Send: drop it inside)
            _ = async { let _ = stop.wait_for(|stop| *stop).await; } => break,
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let router = app.borrow().clone();
            router.oneshot(req.map(Body::new))
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // a client that goes away or times out ends its connection; nothing to report
            let _ = conn.await;
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        eprintln!("[web] some connections were still open {grace:?} after the stop; closing them");
    }
}

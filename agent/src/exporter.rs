//! `ferry agent --metrics ADDR` (a feature): serves `GET /metrics` over
//! plain HTTP (hyper) with the agent's metrics (`crate::metrics`), the
//! gauges read off the node at each scrape. Unauthenticated, like every
//! Prometheus exporter: bind it to loopback or a management network.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::gossip::handle::Liveness;
use crate::metrics::{Readings, CONTENT_TYPE};
use crate::node::Agent;

/// Scrapes served at once; more wait for a free one.
const CONNECTIONS: usize = 8;
/// A connection (request read, answer written) ends within this.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// The longest a scrape waits for Raft's committed index.
const RAFT_ASK: Duration = Duration::from_secs(1);

/// Bind the metrics address (at start, so a taken port is the agent's
/// start error).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serve scrapes until the agent stops.
pub async fn serve(agent: Arc<Agent>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let agent = Arc::clone(&agent);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let agent = Arc::clone(&agent);
                async move { Ok::<_, Infallible>(answer(&agent, &request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_DEADLINE, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, "metrics: {e}"),
                Err(_) => tracing::debug!(%peer, "metrics: connection timed out"),
            }
            drop(slot);
        });
    }
}

async fn answer(agent: &Agent, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "ferry serves /metrics only\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n");
    }
    let readings = readings(agent).await;
    match agent.metrics().encode(&readings) {
        Ok(text) => response(StatusCode::OK, CONTENT_TYPE, text),
        Err(e) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode the metrics: {e}\n"),
        ),
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", text.to_string())
}

fn response(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// What the gauges show, read off Raft, gossip and the applied state.
async fn readings(agent: &Agent) -> Readings {
    let raft = agent.raft().metrics().borrow().clone();
    let applied_index = raft.last_applied.map_or(0, |l| l.index);
    let asked = agent
        .raft()
        .with_raft_state(|st| st.committed.map(|l| l.index));
    let commit_index = match tokio::time::timeout(RAFT_ASK, asked).await {
        Ok(Ok(committed)) => committed.unwrap_or(0),
        // Raft busy or stopped: what is applied was committed.
        _ => applied_index,
    };
    let me = agent.id();
    let (members, instances) = agent.state().read(|s| {
        let members = counts(s.members.keys().map(|&id| match id == me {
            true => Liveness::Alive.as_str(),
            false => agent.gossip().liveness(id).as_str(),
        }));
        let instances = counts(
            s.instances
                .values()
                .filter(|i| i.owner == me)
                .map(|i| i.observed.as_str()),
        );
        (members, instances)
    });
    Readings {
        term: raft.current_term,
        leader: raft.current_leader,
        is_leader: raft.current_leader == Some(me),
        last_log_index: raft.last_log_index.unwrap_or(0),
        commit_index,
        applied_index,
        members,
        instances,
    }
}

fn counts(labels: impl Iterator<Item = &'static str>) -> Vec<(&'static str, i64)> {
    let mut by: BTreeMap<&'static str, i64> = BTreeMap::new();
    for label in labels {
        *by.entry(label).or_default() += 1;
    }
    by.into_iter().collect()
}

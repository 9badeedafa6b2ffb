//! The HTTP endpoints, on two listeners as NPD has them:
//! * the health port (`--address`/`--port`, default 127.0.0.1:20256): `GET /healthz`,
//!   `GET /conditions`; with `--debug-endpoints` (off by default) also the test controls
//!   `POST /debug/sensor/kill-reader?down=DURATION` (fault injection: kills the sensor's reader
//!   and keeps it down that long) and `POST /debug/report?kind=event&reason=..&message=..`
//!   (feeds a report through the same path as the rules engine's);
//! * the Prometheus port (`--prometheus-address`/`--prometheus-port`, default
//!   127.0.0.1:20257): `GET /metrics`.
//!
//! Routing is a plain function from (method, path, query) to a [`Reply`], tested without
//! sockets; [`serve`] puts it on HTTP/1.1 with hyper.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{Method, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{IntCounter, Registry};
use tokio::{net::TcpListener, sync::mpsc};

use crate::{
    exporter::board::ConditionBoard,
    health::Health,
    logging::{LOG_INTERVAL, LogLimiter},
    metrics::{self, Metrics},
    problem::{Condition, ConditionChange, ConditionStatus, ProblemEvent, Report, Severity},
    sensor::SensorView,
    tasks::Tasks,
};

/// A response, before it is put on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl Reply {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    fn not_found() -> Self {
        Self::text(404, "not found\n")
    }

    fn method_not_allowed() -> Self {
        Self::text(405, "method not allowed\n")
    }
}

/// One request, as the routes see it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The method.
    pub method: &'a Method,
    /// The path.
    pub path: &'a str,
    /// The raw query string (empty when there is none).
    pub query: &'a str,
    /// Whether it came in through a loopback address of this host (the connection's local
    /// address is 127.0.0.0/8 or ::1): only processes on the host can make such requests.
    pub loopback: bool,
}

/// What a listener answers.
pub trait Routes: Send + Sync + 'static {
    /// Answers one request.
    fn respond(&self, req: Request<'_>) -> Reply;
}

/// `/metrics`.
#[derive(Debug)]
pub struct MetricsRoutes {
    /// The metrics to expose.
    pub metrics: Metrics,
}

impl Routes for MetricsRoutes {
    fn respond(&self, req: Request<'_>) -> Reply {
        match (req.path, req.method) {
            ("/metrics", &Method::GET | &Method::HEAD) => Reply {
                status: 200,
                content_type: metrics::CONTENT_TYPE,
                body: self.metrics.encode(),
            },
            ("/metrics", _) => Reply::method_not_allowed(),
            _ => Reply::not_found(),
        }
    }
}

/// Test controls, enabled by `--debug-endpoints`.
#[derive(Debug)]
pub struct DebugControls {
    /// The sensor whose reader `kill-reader` kills.
    pub sensor: SensorView,
    /// Where injected reports go (the daemon's report path).
    pub reports: mpsc::Sender<Report>,
}

/// `/healthz`, `/conditions` and, when enabled, `/debug/...`.
#[derive(Debug)]
pub struct HealthRoutes {
    /// npd's health.
    pub health: Arc<Health>,
    /// The current conditions.
    pub conditions: ConditionBoard,
    /// Test controls; `None` unless `--debug-endpoints`.
    pub debug: Option<DebugControls>,
}

impl Routes for HealthRoutes {
    fn respond(&self, req: Request<'_>) -> Reply {
        let Request {
            method,
            path,
            query,
            loopback,
        } = req;
        let get = matches!(*method, Method::GET | Method::HEAD);
        match path {
            "/healthz" if get => {
                let report = self.health.check();
                Reply::text(report.status(), report.body())
            }
            "/conditions" if get => Reply {
                status: 200,
                content_type: "application/json",
                body: format!("{}\n", self.conditions.to_json()),
            },
            "/healthz" | "/conditions" => Reply::method_not_allowed(),
            // The test controls answer only on loopback, whatever --address says.
            p if p.starts_with("/debug/") => match &self.debug {
                None => Reply::not_found(),
                Some(_) if !loopback => Reply::not_found(),
                Some(_) if *method != Method::POST => Reply::method_not_allowed(),
                Some(debug) => debug.respond(path, query),
            },
            _ => Reply::not_found(),
        }
    }
}

impl DebugControls {
    fn respond(&self, path: &str, query: &str) -> Reply {
        let params = parse_query(query);
        let param = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        match path {
            "/debug/sensor/kill-reader" => {
                let down = match param("down").map(humantime::parse_duration).transpose() {
                    Ok(down) => down.unwrap_or(Duration::ZERO),
                    Err(e) => return Reply::text(400, format!("bad down= duration: {e}\n")),
                };
                tracing::warn!(
                    "fault injection: killing the sensor reader, down for {}",
                    humantime::format_duration(down)
                );
                self.sensor.kill_reader(down);
                Reply::text(
                    202,
                    format!(
                        "killing the sensor reader; restarting in {}\n",
                        humantime::format_duration(down)
                    ),
                )
            }
            "/debug/report" => match report_from_params(&param) {
                Ok(report) => match self.reports.try_send(report) {
                    Ok(()) => Reply::text(202, "queued\n"),
                    Err(e) => Reply::text(503, format!("report queue: {e}\n")),
                },
                Err(why) => Reply::text(400, format!("{why}\n")),
            },
            _ => Reply::not_found(),
        }
    }
}

/// Builds a report from `kind=event|condition`, `source`, `reason`, `message`, and for
/// conditions `type` and `status`.
fn report_from_params<'a>(param: &dyn Fn(&str) -> Option<&'a str>) -> Result<Report, String> {
    let reason = param("reason").ok_or("reason= is required")?.to_string();
    let source = param("source").unwrap_or("kernel-monitor").to_string();
    let message = param("message").unwrap_or_default().to_string();
    match param("kind").unwrap_or("event") {
        "event" => Ok(Report::Event(ProblemEvent {
            source,
            severity: Severity::Warning,
            reason,
            message,
            timestamp: std::time::SystemTime::now(),
            fields: serde_json::Map::new(),
            pods: Vec::new(),
        })),
        "condition" => {
            let status = match param("status").unwrap_or("True") {
                "True" => ConditionStatus::True,
                "False" => ConditionStatus::False,
                "Unknown" => ConditionStatus::Unknown,
                other => return Err(format!("status={other}: expected True, False or Unknown")),
            };
            Ok(Report::Condition(ConditionChange {
                source,
                condition: Condition {
                    type_: param("type")
                        .ok_or("type= is required for a condition")?
                        .to_string(),
                    status,
                    reason,
                    message,
                    transition_time: std::time::SystemTime::now(),
                },
            }))
        }
        other => Err(format!("kind={other}: expected event or condition")),
    }
}

/// Splits `a=1&b=x%20y` into decoded pairs (`+` is a space).
fn parse_query(query: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
                    if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                        out.push(h << 4 | l);
                        i += 3;
                        continue;
                    }
                    out.push(b'%');
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

/// Binds a listener, saying which flag to change when the address is taken.
pub async fn bind(addr: SocketAddr, flag: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("listening on {addr} ({flag}): {e}")))
}

/// At most this many connections are served at once per listener; a connection beyond it is
/// closed at once (and counted), so that a flood of connections costs bounded memory.
pub const MAX_CONNECTIONS: usize = 64;

/// A connection that sends no complete request head for this long is closed: a slow client,
/// or an idle keep-alive connection between requests.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP servers: their tasks (every listener and connection, tracked), the token they stop
/// on, and what they count.
#[derive(Clone, Debug)]
pub struct Servers {
    tasks: Tasks,
    refused: IntCounter,
}

static REFUSED: LogLimiter = LogLimiter::new(LOG_INTERVAL, 1);

impl Servers {
    /// No server yet; counts refused connections in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let refused = metrics::int_counter(
            "npd_http_connections_refused_total",
            "HTTP connections closed at once because the listener had its maximum open.",
        );
        metrics::register(registry, &refused)?;
        Ok(Servers {
            tasks: Tasks::default(),
            refused,
        })
    }

    /// Stops accepting, lets open connections finish the request they are on, and waits for
    /// them, at most `limit`.
    pub async fn stop(&self, limit: Duration) {
        self.tasks.stop(limit, "HTTP connections").await;
    }

    /// Serves `routes` on `listener` until [`Servers::stop`]: HTTP/1.1, at most
    /// [`MAX_CONNECTIONS`] at once, each closed after [`IDLE_TIMEOUT`] without a request. No
    /// request body is ever read: a request that has one is answered and its connection
    /// closed.
    pub fn serve<R: Routes>(&self, listener: TcpListener, routes: Arc<R>) {
        let servers = self.clone();
        self.tasks
            .tracker
            .spawn(async move { servers.accept(listener, routes).await });
    }

    async fn accept<R: Routes>(self, listener: TcpListener, routes: Arc<R>) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = self.tasks.cancel.cancelled() => return,
            };
            let (stream, local) = match accepted {
                Ok((stream, _)) => {
                    let local = stream.local_addr().ok();
                    (stream, local)
                }
                Err(e) => {
                    // Out of descriptors and the like: do not spin.
                    tracing::warn!("accepting an HTTP connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                self.refused.inc();
                if let Some(held_back) = REFUSED.allow() {
                    tracing::warn!(
                        held_back,
                        "{MAX_CONNECTIONS} HTTP connections open: closing new ones (counted)"
                    );
                }
                drop(stream);
                continue;
            };
            let loopback = local.is_some_and(|a| a.ip().is_loopback());
            let routes = routes.clone();
            let cancel = self.tasks.cancel.clone();
            self.tasks.tracker.spawn(async move {
                let _slot = slot;
                let service = service_fn(move |req: Request_| {
                    let reply = routes.respond(Request {
                        method: req.method(),
                        path: req.uri().path(),
                        query: req.uri().query().unwrap_or(""),
                        loopback,
                    });
                    let head = *req.method() == Method::HEAD;
                    let has_body = req.headers().contains_key(hyper::header::TRANSFER_ENCODING)
                        || req
                            .headers()
                            .get(hyper::header::CONTENT_LENGTH)
                            .is_some_and(|v| v.as_bytes() != b"0");
                    let mut response = to_response(reply, head);
                    if has_body {
                        // The body is never read: this connection cannot be reused.
                        response.headers_mut().insert(
                            hyper::header::CONNECTION,
                            hyper::header::HeaderValue::from_static("close"),
                        );
                    }
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(IDLE_TIMEOUT)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service);
                let mut connection = std::pin::pin!(connection);
                let result = tokio::select! {
                    result = connection.as_mut() => result,
                    () = cancel.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!("HTTP connection: {e}");
                }
            });
        }
    }
}

type Request_ = hyper::Request<hyper::body::Incoming>;

fn to_response(reply: Reply, head: bool) -> Response<Full<Bytes>> {
    let body = if head {
        Bytes::new()
    } else {
        Bytes::from(reply.body)
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(reply.content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sensor::{ActiveSource, SensorStats};

    fn req<'a>(method: &'a Method, path: &'a str, query: &'a str) -> Request<'a> {
        Request {
            method,
            path,
            query,
            loopback: true,
        }
    }

    #[test]
    fn debug_endpoints_answer_only_on_loopback() {
        let (routes, _, _rx) = routes(true);
        let from_outside = Request {
            loopback: false,
            ..req(&Method::POST, "/debug/report", "reason=KernelOops")
        };
        assert_eq!(routes.respond(from_outside).status, 404);
        let health = Request {
            loopback: false,
            ..req(&Method::GET, "/healthz", "")
        };
        assert_eq!(routes.respond(health).status, 200);
        assert_eq!(
            routes
                .respond(req(&Method::POST, "/debug/report", "reason=KernelOops"))
                .status,
            202
        );
    }

    fn routes(debug: bool) -> (HealthRoutes, Arc<SensorStats>, mpsc::Receiver<Report>) {
        let stats = Arc::new(SensorStats::default());
        stats.reader_running();
        let view = SensorView::detached(ActiveSource::Kmsg, stats.clone());
        let (tx, rx) = mpsc::channel(4);
        let routes = HealthRoutes {
            health: Arc::new(Health::new(view.clone(), Duration::from_secs(60))),
            conditions: ConditionBoard::default(),
            debug: debug.then_some(DebugControls {
                sensor: view,
                reports: tx,
            }),
        };
        (routes, stats, rx)
    }

    #[test]
    fn health_and_conditions() {
        let (routes, stats, _rx) = routes(false);
        let reply = routes.respond(req(&Method::GET, "/healthz", ""));
        assert_eq!(reply.status, 200);
        assert!(reply.body.starts_with("ok\n"));
        stats.reader_failed("/dev/kmsg", &"test");
        let reply = routes.respond(req(&Method::GET, "/healthz", ""));
        assert_eq!(reply.status, 503);
        assert!(
            reply
                .body
                .starts_with("unhealthy\nproblem: sensor is not reading kernel events"),
            "{}",
            reply.body
        );
        let reply = routes.respond(req(&Method::GET, "/conditions", ""));
        assert_eq!(
            (reply.status, reply.content_type, reply.body.as_str()),
            (200, "application/json", "[]\n")
        );
        assert_eq!(
            routes.respond(req(&Method::POST, "/healthz", "")).status,
            405
        );
        assert_eq!(routes.respond(req(&Method::GET, "/nope", "")).status, 404);
    }

    #[test]
    fn debug_endpoints_are_off_by_default() {
        let (routes, _, _rx) = routes(false);
        assert_eq!(
            routes
                .respond(req(&Method::POST, "/debug/sensor/kill-reader", ""))
                .status,
            404
        );
        assert_eq!(
            routes
                .respond(req(&Method::POST, "/debug/report", "reason=KernelOops"))
                .status,
            404
        );
    }

    #[test]
    fn debug_report_injection() {
        let (routes, _, mut rx) = routes(true);
        let reply = routes.respond(req(
            &Method::POST,
            "/debug/report",
            "reason=KernelOops&message=BUG%3A+unable+to+handle+kernel+NULL+pointer+dereference",
        ));
        assert_eq!(reply.status, 202, "{}", reply.body);
        let Some(Report::Event(event)) = rx.try_recv().ok() else {
            panic!("no event queued")
        };
        assert_eq!(
            (
                event.source.as_str(),
                event.reason.as_str(),
                event.message.as_str()
            ),
            (
                "kernel-monitor",
                "KernelOops",
                "BUG: unable to handle kernel NULL pointer dereference"
            )
        );
        let reply = routes.respond(req(
            &Method::POST,
            "/debug/report",
            "kind=condition&type=KernelDeadlock&reason=DockerHung",
        ));
        assert_eq!(reply.status, 202);
        assert!(
            matches!(rx.try_recv(), Ok(Report::Condition(c)) if c.condition.status == ConditionStatus::True)
        );
        assert_eq!(
            routes
                .respond(req(
                    &Method::POST,
                    "/debug/report",
                    "kind=condition&reason=X"
                ))
                .status,
            400
        );
        assert_eq!(
            routes
                .respond(req(&Method::GET, "/debug/report", "reason=X"))
                .status,
            405
        );
        assert_eq!(
            routes
                .respond(req(&Method::POST, "/debug/sensor/kill-reader", "down=2s"))
                .status,
            202
        );
        assert_eq!(
            routes
                .respond(req(&Method::POST, "/debug/sensor/kill-reader", "down=soon"))
                .status,
            400
        );
    }

    #[test]
    fn query_decoding() {
        assert_eq!(
            parse_query("a=1&b=x%20y+z&c&d=%zz&e=%4"),
            [
                ("a", "1"),
                ("b", "x y z"),
                ("c", ""),
                ("d", "%zz"),
                ("e", "%4")
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }

    #[test]
    fn metrics_route() {
        let routes = MetricsRoutes {
            metrics: Metrics::new().unwrap(),
        };
        let reply = routes.respond(req(&Method::GET, "/metrics", ""));
        assert_eq!(reply.status, 200);
        assert_eq!(reply.content_type, metrics::CONTENT_TYPE);
        assert!(reply.body.contains("npd_build_info"));
        assert_eq!(routes.respond(req(&Method::GET, "/", "")).status, 404);
    }
}

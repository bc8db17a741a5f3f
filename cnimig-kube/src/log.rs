//! One `info` log line per write to the API server, in one place.
//!
//! [`LogWritesLayer`] wraps the kube client's HTTP service (see [`KubeCluster::new`]): every
//! request that is not a read (`POST`, `PUT`, `PATCH`, `DELETE`) is logged at `info` on the
//! target `cnimig_kube::log`, with the verb, the resource (and subresource, such as
//! `pods/eviction`), `namespace/name` and whether it is a server-side dry run. The line is
//! logged in the caller's tracing span, so the orchestrator's `step{node=… action=…}` span says
//! which node and which step the write is for. `RUST_LOG=cnimig_kube::log=info` shows just these.
//!
//! [`KubeCluster::new`]: crate::KubeCluster::new

use std::task::{Context, Poll};

/// A write, as the log line names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// `create`, `replace`, `patch` or `delete`.
    pub verb: &'static str,
    /// The resource in the URL (`nodes`, `pods`, `configmaps`, …), with `/subresource` if any.
    pub resource: String,
    /// `namespace/name`, `name` for cluster-scoped objects, or `namespace/` / empty for a
    /// collection.
    pub object: String,
    /// `dryRun=All` was asked: the server checks the write and changes nothing.
    pub dry_run: bool,
}

/// The write a request makes, or `None` for reads.
#[must_use]
pub fn describe(method: &http::Method, uri: &http::Uri) -> Option<Write> {
    let verb = match *method {
        http::Method::POST => "create",
        http::Method::PUT => "replace",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => return None,
    };
    let parts: Vec<&str> = uri.path().split('/').filter(|p| !p.is_empty()).collect();
    // /api/v1/... or /apis/group/version/...
    let rest: &[&str] = match parts.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        other => other,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, more @ ..] if !more.is_empty() => (Some(*ns), more),
        other => (None, other),
    };
    let (resource, name, sub) = match rest {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(*name), None),
        [resource, name, sub, ..] => (*resource, Some(*name), Some(*sub)),
        [] => ("", None, None),
    };
    let resource = match sub {
        Some(sub) => format!("{resource}/{sub}"),
        None => resource.to_string(),
    };
    let object = match (namespace, name) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (Some(ns), None) => format!("{ns}/"),
        (None, Some(name)) => name.to_string(),
        (None, None) => String::new(),
    };
    let dry_run = uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "dryRun=All"));
    Some(Write {
        verb,
        resource,
        object,
        dry_run,
    })
}

/// A tower layer that logs writes; see the [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWritesLayer;

impl<S> tower::Layer<S> for LogWritesLayer {
    type Service = LogWrites<S>;
    fn layer(&self, inner: S) -> LogWrites<S> {
        LogWrites { inner }
    }
}

/// The service of [`LogWritesLayer`].
#[derive(Debug, Clone)]
pub struct LogWrites<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for LogWrites<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(w) = describe(req.method(), req.uri()) {
            tracing::info!(
                target: "cnimig_kube::log",
                verb = w.verb,
                resource = %w.resource,
                object = %w.object,
                dry_run = w.dry_run,
                "{} {} {}{}",
                w.verb,
                w.resource,
                w.object,
                if w.dry_run { " (dry run)" } else { "" }
            );
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::future::{Ready, ready};
    use std::sync::{Arc, Mutex};
    use tower::{Layer, Service};

    fn d(method: http::Method, uri: &str) -> Option<Write> {
        describe(&method, &uri.parse().unwrap())
    }

    #[test]
    fn describes_writes_and_skips_reads() {
        assert_eq!(d(http::Method::GET, "/api/v1/nodes/n1"), None);
        assert_eq!(
            d(http::Method::PATCH, "/api/v1/nodes/n1?fieldManager=cnimig"),
            Some(Write {
                verb: "patch",
                resource: "nodes".into(),
                object: "n1".into(),
                dry_run: false
            })
        );
        assert_eq!(
            d(
                http::Method::POST,
                "/api/v1/namespaces/shop/pods/web-0/eviction"
            ),
            Some(Write {
                verb: "create",
                resource: "pods/eviction".into(),
                object: "shop/web-0".into(),
                dry_run: false
            })
        );
        assert_eq!(
            d(
                http::Method::POST,
                "/apis/apps/v1/namespaces/kube-system/daemonsets?dryRun=All"
            ),
            Some(Write {
                verb: "create",
                resource: "daemonsets".into(),
                object: "kube-system/".into(),
                dry_run: true
            })
        );
        assert_eq!(
            d(
                http::Method::DELETE,
                "/apis/management.cattle.io/v3/clusters/c-1"
            )
            .map(|w| (w.verb, w.resource, w.object)),
            Some(("delete", "clusters".into(), "c-1".into()))
        );
    }

    /// A stand-in for the HTTP connection: answers every request with 200.
    #[derive(Clone)]
    struct Ok200;

    impl Service<http::Request<()>> for Ok200 {
        type Response = http::Response<()>;
        type Error = std::convert::Infallible;
        type Future = Ready<Result<http::Response<()>, std::convert::Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            ready(Ok(http::Response::new(())))
        }
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn logs_writes_in_the_callers_span() {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time()
            .with_env_filter("info")
            .finish();
        let mut svc = LogWritesLayer.layer(Ok200);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("step", node = "worker-1", action = "Evict");
            let _in = span.enter();
            let req = |m: http::Method, uri: &str| {
                http::Request::builder()
                    .method(m)
                    .uri(uri)
                    .body(())
                    .unwrap()
            };
            let _ = futures::executor::block_on(
                svc.call(req(http::Method::GET, "/api/v1/namespaces/shop/pods/web-0")),
            );
            let _ = futures::executor::block_on(svc.call(req(
                http::Method::POST,
                "/api/v1/namespaces/shop/pods/web-0/eviction",
            )));
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "one line, for the write only: {text}");
        assert!(lines[0].contains("INFO"), "{text}");
        assert!(
            lines[0].contains("step{node=\"worker-1\" action=\"Evict\"}"),
            "logged in the caller's span: {text}"
        );
        assert!(
            lines[0].contains("cnimig_kube::log: create pods/eviction shop/web-0"),
            "{text}"
        );
    }
}

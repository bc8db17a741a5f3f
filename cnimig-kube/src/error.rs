//! Kubernetes API errors mapped into the core's [`PortError`].
//!
//! One function, [`port_error`], so every call site names what it attempted (verb and object) and
//! the orchestrator gets a semantic variant it can decide on (retry, conflict, stop).

use std::time::Duration;

use cnimig_core::ports::PortError;

/// Maps a kube-rs error from `verb` on `what` into a [`PortError`].
///
/// | API answer | `PortError` |
/// |---|---|
/// | 404 | `NotFound` |
/// | 409 | `Conflict` |
/// | 401, 403 | `Forbidden` (names the verb and the object: grant it in `deploy/rbac.yaml`) |
/// | 429 | `Throttled` (with the server's `Retry-After`, at least 1 s) |
/// | 400, 422 | `Invalid` |
/// | 408, 504, client timeouts | `Timeout` |
/// | other 5xx, connection failures | `Unavailable` |
pub(crate) fn port_error(verb: &str, what: impl Into<String>, e: kube::Error) -> PortError {
    let what = what.into();
    match e {
        kube::Error::Api(s) => match s.code {
            404 => PortError::NotFound { what },
            409 => PortError::Conflict { what },
            401 | 403 => PortError::Forbidden {
                verb: verb.to_string(),
                what: if s.code == 401 {
                    format!(
                        "{what} (the API server rejected the credentials: {})",
                        s.message
                    )
                } else {
                    what
                },
            },
            429 => PortError::Throttled {
                retry_after: retry_after(&s),
            },
            400 | 422 => PortError::Invalid {
                what: format!("{verb} {what}"),
                detail: s.message,
            },
            408 | 504 => PortError::Timeout {
                what: format!("{verb} {what}: {}", s.message),
            },
            code => PortError::Unavailable {
                what: format!("{verb} {what}"),
                detail: format!("HTTP {code} {}: {}", s.reason, s.message),
            },
        },
        kube::Error::Service(err) => {
            let text = err.to_string();
            if text.contains("timed out") || text.contains("elapsed") {
                PortError::Timeout {
                    what: format!("{verb} {what}: {text}"),
                }
            } else {
                PortError::Unavailable {
                    what: format!("{verb} {what}"),
                    detail: text,
                }
            }
        }
        kube::Error::SerdeError(err) => PortError::Invalid {
            what: format!("{verb} {what}"),
            detail: format!("unexpected response body: {err}"),
        },
        other => PortError::Unavailable {
            what: format!("{verb} {what}"),
            detail: other.to_string(),
        },
    }
}

/// The status' `Retry-After` (at least one second, so callers never spin).
pub(crate) fn retry_after(s: &kube::core::Status) -> Duration {
    let secs = s.details.as_ref().map_or(0, |d| d.retry_after_seconds);
    Duration::from_secs(u64::from(secs.max(1)))
}

/// The HTTP code of an API error, if it is one.
pub(crate) fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn api(code: u16) -> kube::Error {
        kube::Error::Api(Status::failure("boom", "Reason").with_code(code).boxed())
    }

    #[test]
    fn codes_map_to_semantic_variants() {
        assert!(matches!(
            port_error("get", "node a", api(404)),
            PortError::NotFound { .. }
        ));
        assert!(matches!(
            port_error("patch", "node a", api(409)),
            PortError::Conflict { .. }
        ));
        match port_error("patch", "node a", api(403)) {
            PortError::Forbidden { verb, what } => {
                assert_eq!(verb, "patch");
                assert_eq!(what, "node a");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            port_error("list", "pods", api(429)),
            PortError::Throttled {
                retry_after: Duration::from_secs(1)
            }
        );
        assert!(port_error("list", "pods", api(503)).is_transient());
        assert!(port_error("list", "pods", api(504)).is_transient());
        assert!(!port_error("patch", "node a", api(422)).is_transient());
    }
}

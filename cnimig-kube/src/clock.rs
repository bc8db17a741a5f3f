//! The real [`Clock`]: Unix milliseconds and tokio's timer.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use cnimig_core::model::Time;
use cnimig_core::ports::Clock;

use crate::KubeCluster;

/// Wall-clock time as Unix milliseconds; sleeps with `tokio::time::sleep`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl SystemClock {
    /// Now, as Unix milliseconds (0 if the system clock is before 1970).
    #[must_use]
    #[allow(
        clippy::disallowed_methods,
        reason = "this is the Clock port's one real implementation"
    )]
    pub fn unix_now() -> Time {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Time(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

#[async_trait]
impl Clock for SystemClock {
    fn now(&self) -> Time {
        Self::unix_now()
    }
    async fn sleep_until(&self, t: Time) {
        let now = Self::unix_now();
        if t > now {
            tokio::time::sleep(Duration::from_millis(t.0 - now.0)).await;
        }
    }
}

/// The adapter is its own clock (a [`SystemClock`]), so one value fills every port.
#[async_trait]
impl Clock for KubeCluster {
    fn now(&self) -> Time {
        self.inner.clock.now()
    }
    async fn sleep_until(&self, t: Time) {
        self.inner.clock.sleep_until(t).await;
    }
}

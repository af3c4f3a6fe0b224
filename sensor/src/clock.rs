//! The sensor's clocks, in one place.
//!
//! Probe records carry `CLOCK_MONOTONIC` times (`bpf_ktime_get_ns`); events
//! carry wall-clock milliseconds. One offset, taken once at start, turns
//! the first into the second, so the events of a run stay on one timeline
//! even if the wall clock is stepped while it runs.

use nix::time::{ClockId, clock_gettime};

fn ns(id: ClockId) -> i64 {
    clock_gettime(id)
        .map(|t| t.tv_sec() * 1_000_000_000 + t.tv_nsec())
        .unwrap_or(0)
}

/// Now, on the clock the probes use (`bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    ns(ClockId::CLOCK_MONOTONIC) as u64
}

/// Now, on `CLOCK_BOOTTIME`: the monotonic clock plus the time the host
/// spent suspended. `/proc/PID/stat` gives process start times on it.
pub fn boottime_ns() -> u64 {
    ns(ClockId::CLOCK_BOOTTIME) as u64
}

/// Now, in wall-clock milliseconds since the epoch.
pub fn now_ms() -> i64 {
    ns(ClockId::CLOCK_REALTIME) / 1_000_000
}

/// Turns probe times into wall-clock times.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    offset_ns: i64,
}

impl WallClock {
    pub fn new() -> Self {
        Self {
            offset_ns: ns(ClockId::CLOCK_REALTIME) - ns(ClockId::CLOCK_MONOTONIC),
        }
    }

    /// The wall-clock millisecond of a probe time.
    pub fn wall_ms(&self, ktime_ns: u64) -> i64 {
        (ktime_ns as i64 + self.offset_ns) / 1_000_000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_time_of_now_is_the_wall_clock_now() {
        let clock = WallClock::new();
        let wall = clock.wall_ms(monotonic_ns());
        assert!((wall - now_ms()).abs() < 1_000, "{wall} vs {}", now_ms());
    }
}

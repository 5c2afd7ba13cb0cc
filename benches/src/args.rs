//! Parsers of the load tools' command-line values (shared by `vfblk-loadgen` and
//! `vfblk-blkio-load`): each refuses what it cannot represent instead of truncating it.

use std::path::PathBuf;

use crate::loadgen::Workload;

/// What every load tool is told: where, how much, what pattern, how long, and how to report.
#[derive(clap::Args, Debug, Clone)]
pub struct JobArgs {
    /// The backend's vhost-user socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// Virtqueues.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub queues: u16,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    pub qd: u16,
    /// Bytes per request (a multiple of 512).
    #[arg(long, default_value_t = 4096)]
    pub bs: u32,
    /// read, write or mixed[:READ_PERCENT].
    #[arg(long, default_value = "read", value_parser = workload)]
    pub rw: Workload,
    /// Blocks in order instead of at random.
    #[arg(long)]
    pub sequential: bool,
    /// Seconds of I/O (SIGINT or SIGTERM ends it early, with the report).
    #[arg(long, default_value_t = 10.0, value_parser = seconds)]
    pub seconds: f64,
    /// Seconds of I/O before latencies and gaps count (fio's ramp_time).
    #[arg(long, default_value_t = 0.0, value_parser = seconds)]
    pub ramp_time: f64,
    /// Machine-readable summary.
    #[arg(long)]
    pub json: bool,
}

/// A virtqueue size: a power of two of at least 4 that fits 16 bits.
pub fn queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if n < 4 || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two of at least 4"));
    }
    Ok(n)
}

/// A duration in seconds: zero or more, finite.
pub fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1e9).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: seconds, zero or more")),
    }
}

/// Requests per second: at least 1, finite.
pub fn rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 1.0 => Ok(r),
        _ => Err(format!("{s:?}: requests per second, at least 1")),
    }
}

/// Requests per second as [`rate`], or 0 for "none".
pub fn rate_or_zero(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(0.0) => Ok(0.0),
        _ => rate(s).map_err(|e| format!("{e}, or 0")),
    }
}

/// `read`, `write`, `mixed` (half reads) or `mixed:N` (N percent reads).
pub fn workload(s: &str) -> Result<Workload, String> {
    match s.split_once(':') {
        None if s == "read" => Ok(Workload::Read),
        None if s == "write" => Ok(Workload::Write),
        None if s == "mixed" => Ok(Workload::Mixed(50)),
        Some(("mixed", p)) => match p.parse::<u8>() {
            Ok(p) if p <= 100 => Ok(Workload::Mixed(p)),
            _ => Err(format!("mixed:{p}: a read percentage from 0 to 100")),
        },
        _ => Err(format!("{s:?}: read, write or mixed[:N]")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_out_of_range_are_refused_not_truncated() {
        assert_eq!(queue_size("256"), Ok(256));
        for bad in ["0", "2", "100", "65536", "-4", "x"] {
            assert!(queue_size(bad).is_err(), "{bad}");
        }
        assert_eq!(seconds("0"), Ok(0.0));
        assert_eq!(seconds("1.5"), Ok(1.5));
        for bad in ["-1", "NaN", "inf", "1e12", ""] {
            assert!(seconds(bad).is_err(), "{bad}");
        }
        assert_eq!(rate("100"), Ok(100.0));
        for bad in ["0", "0.5", "inf", "NaN", "-3"] {
            assert!(rate(bad).is_err(), "{bad}");
            assert_eq!(rate_or_zero(bad).is_err(), bad != "0", "{bad}");
        }
        assert_eq!(workload("read"), Ok(Workload::Read));
        assert_eq!(workload("write"), Ok(Workload::Write));
        assert_eq!(workload("mixed"), Ok(Workload::Mixed(50)));
        assert_eq!(workload("mixed:70"), Ok(Workload::Mixed(70)));
        for bad in ["mixed:101", "mixed:", "rw", "read:5"] {
            assert!(workload(bad).is_err(), "{bad}");
        }
    }
}

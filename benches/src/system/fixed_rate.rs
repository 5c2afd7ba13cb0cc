//! Cost per I/O that no client hides: our target and SPDK's vhost target, each held at the
//! same fixed request rate by the same paced client, measured by each target's own poller
//! busy time (ours: `stats` busy_seconds; SPDK: `thread_get_stats` busy ticks over its tick
//! rate), in rounds that alternate the targets. An IOPS figure at the client's ceiling says
//! nothing about the target; this does.
//!
//! Both count the same thing: time in poll loops that found work (ours from the first queue
//! with work to the end of the loop; SPDK's reactor counts the pollers that reported work),
//! so idle spinning is left out on both sides.

use std::fmt::Write as _;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::system::suite::{Suite, BACKEND_CPU, CLIENT_CPU, QUEUE_SIZE};
use crate::system::suite_results::Backend;
use crate::{Error, Result};

/// Ours and SPDK's of the same kind: null beside null, our RAM disk on 2 MiB pages beside
/// SPDK's malloc bdev (DPDK's hugepages).
pub const PAIRS: [(Backend, Backend); 2] = [
    (Backend::OursNull, Backend::SpdkNull),
    (Backend::OursMemHuge, Backend::SpdkMalloc),
];

/// The target figure: our busy time per I/O at most this share of SPDK's, in every round.
pub const TARGET_RATIO: f64 = 0.8;

/// Requests in flight the paced client allows.
pub const QD: u16 = 32;

/// One target held at the rate for one round.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Requests completed.
    pub ios: u64,
    /// The target's poller busy time over them.
    pub busy_seconds: f64,
    /// Requests per second the client reached (the rate, unless the target could not keep
    /// up).
    pub iops: f64,
    /// The client's median latency, in microseconds.
    pub lat_p50_us: f64,
    /// A cache line's round trip between the two cores just before the target started and
    /// just after it stopped, in nanoseconds (no target running): the machine's state
    /// around the sample.
    pub core_round_trip_ns: Option<(f64, f64)>,
}

/// Round trips of one cache line between the client's core and the backend's, each side
/// waiting for the other's write: what every request pays at least twice (avail ring one
/// way, used ring back). On this lab's 2-vCPU VM it moves between ~90 ns and ~430 ns as the
/// host places the vCPUs, with no process of ours running.
const ROUND_TRIPS: u64 = 100_000;

/// Nanoseconds per cache-line round trip between [`CLIENT_CPU`] and [`BACKEND_CPU`], or
/// None when the threads cannot be pinned or the other side does not answer within 2 s.
pub fn core_round_trip_ns() -> Option<f64> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    #[repr(align(64))]
    struct Line(AtomicU64);
    let line = Arc::new(Line(AtomicU64::new(0)));
    let deadline = Instant::now() + Duration::from_secs(2);
    // Waits until the line holds `want`; false when the deadline passed (the other thread
    // could not be pinned, or was not scheduled).
    let wait = move |line: &Line, want: u64| {
        let mut spins = 0u32;
        while line.0.load(Ordering::Acquire) != want {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins % 4096 == 0 && Instant::now() > deadline {
                return false;
            }
        }
        true
    };
    let pinned =
        |cpu: u32| core_affinity::set_for_current(core_affinity::CoreId { id: cpu as usize });
    let far = {
        let line = line.clone();
        std::thread::spawn(move || {
            if !pinned(BACKEND_CPU) {
                return false;
            }
            for i in 0..ROUND_TRIPS {
                if !wait(&line, 2 * i + 1) {
                    return false;
                }
                line.0.store(2 * i + 2, Ordering::Release);
            }
            true
        })
    };
    let near = std::thread::spawn(move || {
        if !pinned(CLIENT_CPU) {
            return None;
        }
        let started = Instant::now();
        for i in 0..ROUND_TRIPS {
            line.0.store(2 * i + 1, Ordering::Release);
            if !wait(&line, 2 * i + 2) {
                return None;
            }
        }
        Some(started.elapsed().as_nanos() as f64 / ROUND_TRIPS as f64)
    });
    let ns = near.join().ok().flatten();
    let far_ok = far.join().unwrap_or(false);
    ns.filter(|_| far_ok)
}

/// A sample counts as taken in the machine's fast state when the core round trips around
/// it are at most this many times the fastest of the run.
pub const STEADY_FACTOR: f64 = 2.0;

impl Sample {
    /// Busy nanoseconds per request.
    pub fn ns_per_io(&self) -> f64 {
        self.busy_seconds * 1e9 / self.ios.max(1) as f64
    }

    fn steady(&self, limit_ns: f64) -> bool {
        self.core_round_trip_ns
            .is_some_and(|(a, b)| a <= limit_ns && b <= limit_ns)
    }
}

/// One round of a pair: each target once, the order alternating between rounds.
#[derive(Debug, Clone)]
pub struct Round {
    /// Our target's sample, or why there is none.
    pub ours: std::result::Result<Sample, String>,
    /// None when SPDK is not there.
    pub spdk: Option<std::result::Result<Sample, String>>,
}

impl Round {
    /// Whether both targets' samples were taken in the machine's fast state.
    pub fn steady(&self, limit_ns: f64) -> bool {
        let ok =
            |s: &std::result::Result<Sample, String>| s.as_ref().is_ok_and(|s| s.steady(limit_ns));
        ok(&self.ours) && self.spdk.as_ref().is_none_or(ok)
    }

    /// Ours over SPDK's busy time per I/O, when both were measured.
    pub fn ratio(&self) -> Option<f64> {
        match (&self.ours, &self.spdk) {
            (Ok(o), Some(Ok(s))) if s.ns_per_io() > 0.0 => Some(o.ns_per_io() / s.ns_per_io()),
            _ => None,
        }
    }
}

/// The rounds of one pair.
#[derive(Debug, Clone)]
pub struct Pair {
    /// Our backend.
    pub ours: Backend,
    /// SPDK's of the same kind.
    pub spdk: Backend,
    /// In the order run.
    pub rounds: Vec<Round>,
}

/// What the fixed-rate part of the suite found.
#[derive(Debug, Clone)]
pub struct FixedRateResult {
    /// Requests per second the client was held to.
    pub rate: f64,
    /// Seconds each target was held at the rate.
    pub seconds: f64,
    /// Null beside null, RAM beside RAM.
    pub pairs: Vec<Pair>,
    /// The client's command (the socket is the suite's).
    pub client_command: String,
    /// Why SPDK's side was not measured, if it was not.
    pub spdk_missing: Option<String>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

impl Pair {
    fn ours_ns(&self) -> Vec<f64> {
        let ok = |r: &Round| r.ours.as_ref().ok().map(Sample::ns_per_io);
        self.rounds.iter().filter_map(ok).collect()
    }

    fn spdk_ns(&self) -> Vec<f64> {
        let ok = |r: &Round| r.spdk.as_ref()?.as_ref().ok().map(Sample::ns_per_io);
        self.rounds.iter().filter_map(ok).collect()
    }

    /// The largest ratio over the rounds, and whether every round was measured on both sides.
    pub fn worst_ratio(&self) -> (Option<f64>, bool) {
        let ratios: Vec<f64> = self.rounds.iter().filter_map(Round::ratio).collect();
        let complete = !self.rounds.is_empty() && ratios.len() == self.rounds.len();
        (ratios.into_iter().reduce(f64::max), complete)
    }

    /// The median of the rounds' ratios.
    pub fn median_ratio(&self) -> Option<f64> {
        median(self.rounds.iter().filter_map(Round::ratio).collect())
    }

    /// The ratios of the rounds taken in the machine's fast state.
    pub fn steady_ratios(&self, limit_ns: Option<f64>) -> Vec<f64> {
        let Some(limit) = limit_ns else {
            return Vec::new();
        };
        self.rounds
            .iter()
            .filter(|r| r.steady(limit))
            .filter_map(Round::ratio)
            .collect()
    }
}

fn sample_json(s: &std::result::Result<Sample, String>) -> Value {
    match s {
        Ok(s) => json!({
            "ios": s.ios,
            "busy_seconds": s.busy_seconds,
            "iops": s.iops,
            "lat_p50_us": s.lat_p50_us,
            "core_round_trip_ns": s.core_round_trip_ns.map(|(a, b)| [a, b]),
            "ns_per_io": s.ns_per_io(),
        }),
        Err(e) => json!({"error": e}),
    }
}

impl FixedRateResult {
    /// Round trips at most this long mark the machine's fast state: [`STEADY_FACTOR`] times
    /// the fastest seen in the run.
    pub fn steady_limit_ns(&self) -> Option<f64> {
        let samples = self.pairs.iter().flat_map(|p| &p.rounds).flat_map(|r| {
            let spdk = r.spdk.as_ref().and_then(|s| s.as_ref().ok());
            r.ours.as_ref().ok().into_iter().chain(spdk)
        });
        samples
            .filter_map(|s| s.core_round_trip_ns)
            .map(|(a, b)| a.min(b))
            .reduce(f64::min)
            .map(|fastest| fastest * STEADY_FACTOR)
    }

    /// The result as JSON (each round, medians, worst ratio, the verdict).
    pub fn to_json(&self) -> Value {
        let limit = self.steady_limit_ns();
        json!({
            "steady_limit_ns": limit,
            "rate": self.rate,
            "qd": QD,
            "seconds": self.seconds,
            "target_ratio": TARGET_RATIO,
            "client_command": self.client_command,
            "spdk_missing": self.spdk_missing,
            "pairs": self.pairs.iter().map(|p| {
                let (worst, complete) = p.worst_ratio();
                json!({
                    "ours": p.ours.id(),
                    "spdk": p.spdk.id(),
                    "rounds": p.rounds.iter().map(|r| json!({
                        "ours": sample_json(&r.ours),
                        "spdk": r.spdk.as_ref().map(sample_json),
                        "ratio": r.ratio(),
                        "steady": limit.is_some_and(|l| r.steady(l)),
                    })).collect::<Vec<_>>(),
                    "steady_rounds": p.steady_ratios(limit).len(),
                    "worst_ratio_steady": p.steady_ratios(limit).into_iter().reduce(f64::max),
                    "median_ratio_steady": median(p.steady_ratios(limit)),
                    "median_ours_ns_per_io": median(p.ours_ns()),
                    "median_spdk_ns_per_io": median(p.spdk_ns()),
                    "median_ratio": p.median_ratio(),
                    "worst_ratio": worst,
                    "every_round_within_target": complete && worst.is_some_and(|w| w <= TARGET_RATIO),
                })
            }).collect::<Vec<_>>(),
        })
    }

    /// The result as a markdown section: a table per pair.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "## Cost per I/O at a fixed rate\n\nEach target alone on CPU {BACKEND_CPU}, held at {} random 4 KiB reads/s (QD{QD}) by the same paced client on CPU {CLIENT_CPU} for {} s; its own poller busy time per I/O (ours: `stats` busy_seconds; SPDK: `thread_get_stats` busy ticks), rounds alternating which target goes first. Target: ours ≤ {TARGET_RATIO}x SPDK's in every round.\n",
            crate::system::thousands(self.rate),
            self.seconds
        );
        if let Some(why) = &self.spdk_missing {
            let _ = writeln!(out, "SPDK not measured: {why}.\n");
        }
        let cell = |s: &std::result::Result<Sample, String>| match s {
            Ok(s) => format!(
                "{:.0} ({}; {:.1}; {})",
                s.ns_per_io(),
                crate::system::thousands(s.iops),
                s.lat_p50_us,
                s.core_round_trip_ns
                    .map(|(a, b)| format!("{a:.0}/{b:.0}"))
                    .unwrap_or_else(|| "—".into())
            ),
            Err(e) => format!("failed: {e}"),
        };
        let limit = self.steady_limit_ns();
        for p in &self.pairs {
            let _ = writeln!(
                out,
                "### {} beside {}\n\n| round | ours, ns per I/O (IOPS; client's p50 µs; core round trip ns) | SPDK, the same | ratio | machine |\n|---|---|---|---|---|",
                p.ours.describe(),
                p.spdk.describe()
            );
            for (i, r) in p.rounds.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} |",
                    i + 1,
                    cell(&r.ours),
                    r.spdk.as_ref().map(cell).unwrap_or_else(|| "—".into()),
                    r.ratio().map(|x| format!("{x:.2}x")).unwrap_or_default(),
                    if limit.is_some_and(|l| r.steady(l)) {
                        "fast"
                    } else {
                        "slow"
                    }
                );
            }
            let f = |x: Option<f64>, unit: &str| x.map(|x| format!("{x:.2}{unit}"));
            let (worst, complete) = p.worst_ratio();
            let _ = writeln!(
                out,
                "\nMedian: ours {} ns, SPDK {} ns, ratio {}; worst round {}{}.\n",
                f(median(p.ours_ns()), "").unwrap_or_else(|| "—".into()),
                f(median(p.spdk_ns()), "").unwrap_or_else(|| "—".into()),
                f(p.median_ratio(), "x").unwrap_or_else(|| "—".into()),
                f(worst, "x").unwrap_or_else(|| "—".into()),
                match (complete, worst) {
                    (true, Some(w)) if w <= TARGET_RATIO => " (every round within the target)",
                    (true, Some(_)) => " (**over the target**)",
                    _ => " (not every round measured on both sides)",
                }
            );
            let steady = p.steady_ratios(limit);
            if let (Some(l), Some(worst)) = (limit, steady.iter().copied().reduce(f64::max)) {
                let _ = writeln!(
                    out,
                    "In the {} of {} rounds taken in the machine's fast state (every core round trip ≤ {l:.0} ns, {STEADY_FACTOR}x the run's fastest): median ratio {:.2}x, worst {worst:.2}x{}.\n",
                    steady.len(),
                    p.rounds.len(),
                    median(steady.clone()).unwrap_or(worst),
                    if worst <= TARGET_RATIO {
                        ", within the target"
                    } else {
                        ", **over the target**"
                    }
                );
            }
        }
        out
    }
}

/// Busy seconds of the running target `b`'s pollers so far.
fn busy_seconds(suite: &Suite, b: Backend) -> Result<f64> {
    let spdk = matches!(b, Backend::SpdkNull | Backend::SpdkMalloc);
    let rpc = suite.rpc_socket(b);
    let mut client = vfblk_control::rpc::Client::connect(&rpc)
        .map_err(|e| Error::Run(format!("RPC of {}: {}", b.id(), crate::error_chain(&e))))?;
    let method = if spdk { "thread_get_stats" } else { "stats" };
    let params = if spdk { Value::Null } else { json!({}) };
    let answer = client.call(method, params).map_err(|e| {
        Error::Run(format!(
            "{method} of {}: {}",
            b.id(),
            crate::error_chain(&e)
        ))
    })?;
    busy_from(spdk, &answer)
        .ok_or_else(|| Error::Run(format!("{method} of {}: no busy time in {answer}", b.id())))
}

/// The busy seconds in a `stats` answer (ours) or a `thread_get_stats` one (SPDK).
fn busy_from(spdk: bool, answer: &Value) -> Option<f64> {
    if spdk {
        let ticks_per_second = answer["tick_rate"].as_f64().filter(|&t| t > 0.0)?;
        let threads = answer["threads"].as_array()?;
        let ticks: f64 = threads.iter().filter_map(|t| t["busy"].as_f64()).sum();
        Some(ticks / ticks_per_second)
    } else {
        let pollers = answer["pollers"].as_array()?;
        Some(
            pollers
                .iter()
                .filter_map(|p| p["busy_seconds"].as_f64())
                .sum(),
        )
    }
}

impl Suite {
    /// The paced client's arguments.
    fn fixed_rate_client(&self, rate: f64, seconds: f64) -> Vec<String> {
        [
            self.bin_dir.join("vfblk-loadgen").display().to_string(),
            "--socket".into(),
            self.socket.display().to_string(),
            "--rw".into(),
            "read".into(),
            "--bs".into(),
            "4096".into(),
            "--qd".into(),
            QD.to_string(),
            "--queues".into(),
            "1".into(),
            "--queue-size".into(),
            QUEUE_SIZE.to_string(),
            "--polled".into(),
            "--rate".into(),
            rate.to_string(),
            "--seconds".into(),
            seconds.to_string(),
            "--json".into(),
        ]
        .into_iter()
        .chain(
            self.options
                .fixed_rate_packed
                .then(|| "--packed".to_string()),
        )
        .collect()
    }

    /// Starts `b`, holds it at `rate` for `seconds` and reads its busy time around that.
    fn fixed_rate_sample(&self, b: Backend, rate: f64, seconds: f64) -> Result<Sample> {
        // Before the target starts and after it stops: its poller spins on that core.
        let round_trip_before = core_round_trip_ns();
        let running = self.start(b, 1)?;
        // Let it settle (SPDK's reactor and our poller start spinning at once; the first
        // connection maps the client's memory).
        std::thread::sleep(std::time::Duration::from_millis(300));
        let before = busy_seconds(self, b)?;
        let out = Command::new("taskset")
            .args(["-c", &CLIENT_CPU.to_string()])
            .args(self.fixed_rate_client(rate, seconds))
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map_err(crate::io_error("running vfblk-loadgen"))?;
        let after = busy_seconds(self, b)?;
        drop(running);
        let round_trip_after = core_round_trip_ns();
        let report: Value = serde_json::from_slice(&out.stdout)
            .map_err(|_| Error::Run(format!("vfblk-loadgen printed no report ({})", out.status)))?;
        let ios = report["ios"].as_u64().unwrap_or(0);
        if ios == 0 || report["failed"] != 0 {
            return Err(Error::Run(format!("no clean I/O: {report}")));
        }
        Ok(Sample {
            ios,
            busy_seconds: after - before,
            iops: report["iops"].as_f64().unwrap_or(0.0),
            lat_p50_us: report["lat_p50_us"].as_f64().unwrap_or(0.0),
            core_round_trip_ns: round_trip_before.zip(round_trip_after),
        })
    }

    /// `rounds` rounds of every pair whose ours is runnable; SPDK's side when it is.
    pub(crate) fn fixed_rate(
        &self,
        rate: f64,
        seconds: f64,
        rounds: u32,
        spdk_missing: Option<String>,
    ) -> FixedRateResult {
        let mut pairs = Vec::new();
        for (ours, spdk) in PAIRS {
            let mut pair = Pair {
                ours,
                spdk,
                rounds: Vec::new(),
            };
            for round in 0..rounds {
                tracing::info!(
                    "fixed rate, round {}/{rounds}: {} and {}",
                    round + 1,
                    ours.id(),
                    spdk.id()
                );
                let measure = |b: Backend| {
                    self.fixed_rate_sample(b, rate, seconds)
                        .map_err(|e| crate::error_chain(&e))
                };
                // Alternate who goes first: neither always runs on a machine just warmed
                // (or disturbed) by the other.
                let (o, s) = if round % 2 == 0 {
                    let o = measure(ours);
                    (o, spdk_missing.is_none().then(|| measure(spdk)))
                } else {
                    let s = spdk_missing.is_none().then(|| measure(spdk));
                    (measure(ours), s)
                };
                let r = Round { ours: o, spdk: s };
                let show = |s: &std::result::Result<Sample, String>| match s {
                    Ok(s) => format!(
                        "{:.0} ns/IO (p50 {:.1} µs, core round trip {:?} ns)",
                        s.ns_per_io(),
                        s.lat_p50_us,
                        s.core_round_trip_ns
                    ),
                    Err(e) => format!("failed: {e}"),
                };
                tracing::info!(
                    "  ours {}, SPDK {}",
                    show(&r.ours),
                    r.spdk.as_ref().map(show).unwrap_or_else(|| "—".into())
                );
                pair.rounds.push(r);
            }
            pairs.push(pair);
        }
        let mut client = self.fixed_rate_client(rate, seconds);
        client.insert(0, format!("taskset -c {CLIENT_CPU}"));
        FixedRateResult {
            rate,
            seconds,
            pairs,
            client_command: client.join(" "),
            spdk_missing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(busy_ns_per_io: f64) -> std::result::Result<Sample, String> {
        Ok(Sample {
            ios: 1_000_000,
            busy_seconds: busy_ns_per_io * 1e6 / 1e9,
            iops: 300_000.0,
            lat_p50_us: 10.0,
            core_round_trip_ns: Some((90.0, 95.0)),
        })
    }

    #[test]
    fn busy_time_is_read_from_both_targets_answers() {
        let ours = json!({"pid": 1, "controllers": [], "pollers": [
            {"name": "p0", "busy_seconds": 0.25}, {"name": "p1", "busy_seconds": 0.5}]});
        assert_eq!(busy_from(false, &ours), Some(0.75));
        let spdk = json!({"tick_rate": 2_000_000_000u64, "threads": [
            {"name": "app_thread", "busy": 1_000_000_000u64, "idle": 5},
            {"name": "vdev", "busy": 3_000_000_000u64, "idle": 5}]});
        assert_eq!(busy_from(true, &spdk), Some(2.0));
        assert_eq!(busy_from(true, &json!({"threads": []})), None);
        assert_eq!(busy_from(false, &json!({})), None);
    }

    #[test]
    fn rounds_in_the_machines_slow_state_are_told_apart_by_the_core_round_trip() {
        let at = |ns: f64, trip: f64| {
            ok(ns).map(|s| Sample {
                core_round_trip_ns: Some((trip, trip)),
                ..s
            })
        };
        let pair = Pair {
            ours: Backend::OursNull,
            spdk: Backend::SpdkNull,
            rounds: vec![
                Round {
                    ours: at(140.0, 50.0),
                    spdk: Some(at(200.0, 60.0)),
                },
                // The host moved a vCPU: every cache line costs 7x, ours was measured then.
                Round {
                    ours: at(520.0, 380.0),
                    spdk: Some(at(210.0, 55.0)),
                },
            ],
        };
        let r = FixedRateResult {
            rate: 300_000.0,
            seconds: 3.0,
            pairs: vec![pair],
            client_command: "c".into(),
            spdk_missing: None,
        };
        assert_eq!(r.steady_limit_ns(), Some(100.0));
        assert_eq!(r.pairs[0].steady_ratios(Some(100.0)), vec![0.7]);
        let md = r.to_markdown();
        assert!(md.contains("| 2.48x | slow |"), "{md}");
        assert!(
            md.contains("In the 1 of 2 rounds taken in the machine's fast state (every core round trip ≤ 100 ns, 2x the run's fastest): median ratio 0.70x, worst 0.70x, within the target."),
            "{md}"
        );
        assert!(
            md.contains("worst round 2.48x (**over the target**)"),
            "{md}"
        );
    }

    #[test]
    fn the_verdict_needs_every_round_within_the_target() {
        let pair = |rounds: Vec<Round>| Pair {
            ours: Backend::OursNull,
            spdk: Backend::SpdkNull,
            rounds,
        };
        let within = pair(vec![
            Round {
                ours: ok(150.0),
                spdk: Some(ok(250.0)),
            },
            Round {
                ours: ok(180.0),
                spdk: Some(ok(240.0)),
            },
        ]);
        assert_eq!(within.worst_ratio(), (Some(0.75), true));
        assert_eq!(within.median_ratio(), Some(0.675));
        // One slow round is enough to miss it, whatever the median says.
        let slow = pair(vec![
            Round {
                ours: ok(150.0),
                spdk: Some(ok(250.0)),
            },
            Round {
                ours: ok(450.0),
                spdk: Some(ok(250.0)),
            },
            Round {
                ours: ok(150.0),
                spdk: Some(ok(250.0)),
            },
        ]);
        assert_eq!(slow.median_ratio(), Some(0.6));
        assert_eq!(slow.worst_ratio().0, Some(1.8));
        // A round SPDK failed in is no round within the target.
        let failed = pair(vec![Round {
            ours: ok(150.0),
            spdk: Some(Err("no".into())),
        }]);
        assert_eq!(failed.worst_ratio(), (None, false));
        let r = FixedRateResult {
            rate: 300_000.0,
            seconds: 3.0,
            pairs: vec![within, slow, failed],
            client_command: "c".into(),
            spdk_missing: None,
        };
        let j = r.to_json();
        assert_eq!(j["pairs"][0]["every_round_within_target"], true, "{j}");
        assert_eq!(j["pairs"][1]["every_round_within_target"], false, "{j}");
        assert_eq!(j["pairs"][2]["every_round_within_target"], false, "{j}");
        // Every sample had 90/95 ns round trips: all rounds fast.
        assert_eq!(r.steady_limit_ns(), Some(180.0));
        assert_eq!(j["pairs"][1]["steady_rounds"], 3, "{j}");
        assert_eq!(j["pairs"][1]["worst_ratio_steady"], 1.8, "{j}");
        let md = r.to_markdown();
        assert!(
            md.contains(
                "| 2 | 450 (300,000; 10.0; 90/95) | 250 (300,000; 10.0; 90/95) | 1.80x | fast |"
            ),
            "{md}"
        );
        assert!(
            md.contains("worst round 1.80x (**over the target**)"),
            "{md}"
        );
        assert!(
            md.contains("worst round 0.75x (every round within the target)"),
            "{md}"
        );
    }
}

//! `vfblk-keeper`: keeps a target's connections across its crashes where systemd's
//! file-descriptor store is not used: `vfblk-keeper -- vfblk-bridge --config ...`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vfblk_control::keeper::{self, KeeperOptions};

/// Run a target and hold its fds, so that a crashed target is started again without any
/// frontend noticing (see docs/recovery.md).
#[derive(Parser, Debug)]
#[command(name = "vfblk-keeper", version, trailing_var_arg = true)]
struct Args {
    /// Private directory for the notify socket (default: $RUNTIME_DIRECTORY,
    /// $XDG_RUNTIME_DIR or the temporary directory, plus vfblk-keeper-PID).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Like systemd's WatchdogSec=: once ready, the target must say WATCHDOG=1 within every
    /// SECS (it does while all its pollers make progress), or it is aborted and started
    /// again.
    #[arg(long, value_name = "SECS", value_parser = watchdog_secs)]
    watchdog_sec: Option<f64>,
    /// The target's command line, after `--`.
    #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
    command: Vec<OsString>,
}

fn watchdog_secs(s: &str) -> Result<f64, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !(1.0..=86_400.0).contains(&secs) {
        return Err(format!("{secs} s: between 1 and 86400"));
    }
    Ok(secs)
}

fn main() -> ExitCode {
    let args = Args::parse();
    vfblk_control::init_logging(vfblk_control::LogFormat::Text);
    let options = KeeperOptions {
        command: args.command,
        dir: args.dir.unwrap_or_else(keeper::default_dir),
        watchdog: args.watchdog_sec.map(std::time::Duration::from_secs_f64),
    };
    match keeper::run(&options) {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&report).expect("a report serializes")
                );
            } else {
                eprintln!(
                    "vfblk-keeper: {} restart(s); the target ended with {}",
                    report.restarts,
                    report
                        .exit_code
                        .map_or("a signal".to_string(), |c| format!("exit code {c}"))
                );
            }
            match report.exit_code {
                Some(0) => ExitCode::SUCCESS,
                _ => ExitCode::FAILURE,
            }
        }
        Err(e) => {
            eprintln!("vfblk-keeper: {}", vfblk_vhost::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

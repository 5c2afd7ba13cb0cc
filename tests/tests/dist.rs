//! What the project ships beside the binaries: the systemd unit in dist/, as the operator's
//! manual shows it, sandboxed, with flags the target takes.

use std::path::PathBuf;
use std::process::Command;

use vfblk_tests::bin;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn unit_path() -> PathBuf {
    repo().join("dist/systemd/vfblk-bridge.service")
}

fn unit() -> String {
    std::fs::read_to_string(unit_path()).expect("dist/systemd/vfblk-bridge.service")
}

/// The manual shows the unit as shipped (all but its first comment line), so the two never
/// drift apart (the manual's copy once lacked NotifyAccess=all).
#[test]
fn the_manual_shows_the_unit_that_is_shipped() {
    let unit = unit();
    let body = unit.split_once('\n').map(|(_, b)| b).unwrap_or("");
    let manual = std::fs::read_to_string(repo().join("docs/operation.md")).unwrap();
    assert!(
        manual.contains(&format!("```ini\n{body}```\n")),
        "docs/operation.md does not show dist/systemd/vfblk-bridge.service as it is"
    );
}

/// The unit keeps what recovery needs (the fd store, MAINPID from an upgraded child, the
/// watchdog) and every flag of its ExecStart= is one the target takes.
#[test]
fn the_unit_keeps_recovery_and_its_flags_are_the_targets() {
    let unit = unit();
    for line in [
        "Type=notify",
        "NotifyAccess=all",
        "FileDescriptorStoreMax=",
        "WatchdogSec=",
        "LimitMEMLOCK=infinity",
        "ExecStartPre=+",
    ] {
        assert!(unit.contains(line), "the unit lacks {line:?}");
    }
    let exec: String = unit
        .lines()
        .skip_while(|l| !l.starts_with("ExecStart="))
        .take_while(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('\\'))
        .collect::<Vec<_>>()
        .join(" ");
    assert!(exec.contains("--fd-store"), "{exec}");
    let help = Command::new(bin("vfblk-bridge"))
        .arg("--help")
        .output()
        .expect("vfblk-bridge --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let flags: Vec<&str> = exec
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .collect();
    assert!(flags.len() >= 5, "{exec}");
    for flag in flags {
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "vfblk-bridge takes no {flag}: {help}"
        );
    }
}

/// `systemd-analyze security` rates the unit's sandbox (offline: no running systemd needed).
/// Without the sandbox it rated 9.8 UNSAFE; the target runs as root for VFIO, so the rest
/// comes from capabilities, a read-only system, a device ACL and a system call filter.
#[test]
fn the_units_sandbox_rates_ok_in_systemd_analyze_security() {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit_path())
        .output()
        .expect("systemd-analyze (scripts/setup.sh installs systemd)");
    let text = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for vfblk-bridge.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    eprintln!("systemd-analyze security: exposure {exposure}");
    assert!(
        exposure <= 3.0,
        "the unit's exposure is {exposure} (at most 3.0 wanted):\n{text}"
    );
}

/// The project's own package (scripts/build-deb.sh, here of the tests' build): the four
/// binaries in /usr/bin, runnable once unpacked, the unit naming them there, the manuals.
#[test]
fn the_projects_deb_holds_the_binaries_the_unit_and_the_manuals() {
    let out = std::env::temp_dir().join(format!("vfblk-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let bin_dir = bin("vfblk-bridge").parent().unwrap().to_path_buf();
    let built = Command::new("bash")
        .arg(repo().join("scripts/build-deb.sh"))
        .arg("--out")
        .arg(&out)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .output()
        .expect("scripts/build-deb.sh");
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let deb = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a .deb");
    let field = |name: &str| {
        let o = Command::new("dpkg-deb")
            .args(["--field"])
            .arg(&deb)
            .arg(name)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(field("Package"), "vfblk");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    let root = out.join("root");
    let unpacked = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .unwrap();
    assert!(unpacked.success());
    for b in ["vfblk-bridge", "vfblk-rpc", "vfblk-keeper", "vfblk-setup"] {
        let v = Command::new(root.join("usr/bin").join(b))
            .arg("-V")
            .output()
            .unwrap_or_else(|e| panic!("{b}: {e}"));
        let v = String::from_utf8_lossy(&v.stdout);
        assert!(v.starts_with(&format!("{b} ")), "{b} -V: {v}");
    }
    let unit =
        std::fs::read_to_string(root.join("lib/systemd/system/vfblk-bridge.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/vfblk-bridge "), "{unit}");
    assert!(!unit.contains("/usr/local/"), "{unit}");
    for doc in ["operation.md", "recovery.md", "copyright"] {
        assert!(root.join("usr/share/doc/vfblk").join(doc).exists(), "{doc}");
    }
    let _ = std::fs::remove_dir_all(&out);
}

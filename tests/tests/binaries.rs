//! What every program says about itself, and where its options may go.

use std::process::Command;

use vfblk_tests::bin;

/// Every binary the project installs.
const BINARIES: &[&str] = &[
    "vfblk-bridge",
    "vfblk-rpc",
    "vfblk-setup",
    "vfblk-keeper",
    "vfblk-loadgen",
    "vfblk-blkio-load",
    "vfblk-bench",
    "vfblk-nvme",
    "vfblk-lab",
];

#[test]
fn every_binary_names_itself_in_its_version() {
    for name in BINARIES {
        let out = Command::new(bin(name)).arg("-V").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name} -V: {out:?}");
        assert!(
            text.starts_with(&format!("{name} ")),
            "{name} -V printed {text:?}"
        );
    }
}

#[test]
fn json_goes_before_or_after_the_subcommand() {
    // No target at this socket: the request fails, but only after the command line parsed
    // (clap's usage errors exit with 2).
    let socket = std::env::temp_dir().join(format!("vfblk-no-target-{}.sock", std::process::id()));
    for args in [
        vec!["--json", "backend-list"],
        vec!["backend-list", "--json"],
    ] {
        let out = Command::new(bin("vfblk-rpc"))
            .arg("--socket")
            .arg(&socket)
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.starts_with("vfblk-rpc: "), "{args:?}: {err}");
    }
    let out = Command::new(bin("vfblk-setup"))
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert_ne!(
        out.status.code(),
        Some(2),
        "vfblk-setup status --json: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn release_binaries_carry_no_test_flags_and_the_tests_own_do() {
    let help = |dir: std::path::PathBuf| {
        let out = Command::new(dir.join("vfblk-bridge"))
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let release = vfblk_lab::release_bin_dir().unwrap();
    let tests = vfblk_lab::project_bin_dir().unwrap();
    assert!(release.ends_with("release") && tests.ends_with("test-bins"));
    for flag in ["--test-delay-ms", "--test-skip-dirty-log"] {
        assert!(!help(release.clone()).contains(flag), "release: {flag}");
        assert!(help(tests.clone()).contains(flag), "test-bins: {flag}");
    }
}

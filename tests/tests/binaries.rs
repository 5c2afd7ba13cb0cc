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
fn the_tests_binaries_are_their_own_build_with_the_test_flags() {
    // Built in target/test-bins, never target/release (what cargo build --release makes and
    // an operator installs; the lab crate's unit test checks that build asks for no test
    // feature, without a second build here).
    let tests = vfblk_lab::project_bin_dir().unwrap();
    assert!(tests.ends_with("test-bins"), "{}", tests.display());
    let out = Command::new(tests.join("vfblk-bridge"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--test-delay-ms", "--test-skip-dirty-log"] {
        assert!(help.contains(flag), "test-bins: {flag}");
    }
}

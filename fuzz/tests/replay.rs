//! Runs every stored input of every fuzz target (`fuzz/corpus/<target>/`): the corpus the
//! fuzzer built and the crashes it found, kept as regression tests once fixed.

use std::path::Path;

#[test]
fn every_corpus_input_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut total = 0;
    for (name, target) in vfblk_fuzz::TARGETS {
        let dir = root.join(name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            panic!("no corpus for {name} in {}", dir.display());
        };
        let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        assert!(!files.is_empty(), "an empty corpus for {name}");
        for file in &files {
            let data = std::fs::read(file).unwrap();
            target(&data);
        }
        eprintln!("{name}: {} input(s)", files.len());
        total += files.len();
    }
    assert!(total > 0);
}

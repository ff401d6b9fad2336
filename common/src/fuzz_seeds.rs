//! Checked-in fuzz seed corpora (`<crate>/fuzz/seeds/<target>/`), made by the real encoders.
//! Each crate's `fuzz_seeds` test calls [`check`]: it fails when an encoding changed and the
//! seeds are stale; `VIOLA_WRITE_FUZZ_SEEDS=1` rewrites them.

use std::path::Path;

/// Compares (or, with `VIOLA_WRITE_FUZZ_SEEDS` set, writes) each seed under `dir` and runs the
/// fuzz entry point `run` on it. Panics on a stale seed: meant for tests.
pub fn check<S: AsRef<[u8]>>(dir: &Path, seeds: &[(&str, S)], run: impl Fn(&[u8])) {
    for (name, bytes) in seeds {
        let bytes = bytes.as_ref();
        let path = dir.join(name);
        if std::env::var_os("VIOLA_WRITE_FUZZ_SEEDS").is_some() {
            std::fs::create_dir_all(dir).expect("create the seed directory");
            std::fs::write(&path, bytes).expect("write a seed");
        }
        let on_disk = std::fs::read(&path).unwrap_or_default();
        assert!(
            on_disk == bytes,
            "{} is stale: rerun with VIOLA_WRITE_FUZZ_SEEDS=1",
            path.display()
        );
        run(bytes);
    }
}

//! A real job for a pool: hash every file under a directory with
//! `imap_unordered`, printing progress as results arrive, then a
//! fingerprint of the whole tree.
//!
//! Run: `cargo run --release --example hash_tree -- [DIR]` (default: `crates`)

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use proc::Pool;

/// What a worker reports for one file.
#[derive(serde::Serialize, serde::Deserialize)]
struct Hashed {
    path: PathBuf,
    bytes: u64,
    hash: u64,
}

/// FNV-1a over the file's bytes (runs in a worker process).
fn hash_file(path: PathBuf) -> Result<Hashed, String> {
    let mut file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        for &b in &buf[..n] {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    Ok(Hashed { path, bytes, hash })
}

/// Every regular file under `dir` (symlinks not followed).
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        match entry.file_type() {
            Ok(t) if t.is_dir() => files_under(&entry.path(), out),
            Ok(t) if t.is_file() => out.push(entry.path()),
            _ => {}
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    proc::init();
    let root = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "crates".into()));
    let mut files = Vec::new();
    files_under(&root, &mut files);
    let total = files.len();
    println!(
        "hashing {total} files under {} with {} workers",
        root.display(),
        proc::cpu_count()
    );

    let start = Instant::now();
    let pool = Pool::new(proc::cpu_count())?;
    let mut hashes = BTreeMap::new();
    let mut bytes = 0u64;
    let mut failed = 0;
    // Results come back as workers finish them, a few files per task.
    for (done, result) in pool.imap_unordered_chunked(hash_file, files, 4).enumerate() {
        match result {
            Ok(Ok(h)) => {
                bytes += h.bytes;
                hashes.insert(h.path, h.hash);
            }
            Ok(Err(io)) => {
                failed += 1;
                eprintln!("\n  skipped {io}");
            }
            Err(task) => {
                failed += 1;
                eprintln!("\n  task failed: {task}");
            }
        }
        print!(
            "\r  [{:>6}/{total}] {:>8.1} MiB",
            done + 1,
            bytes as f64 / (1 << 20) as f64
        );
        std::io::stdout().flush()?;
    }
    pool.close();
    pool.join()?;

    // One fingerprint for the tree: the file hashes in path order.
    let mut tree = 0xcbf2_9ce4_8422_2325u64;
    for (path, hash) in &hashes {
        for b in path.to_string_lossy().bytes().chain(hash.to_le_bytes()) {
            tree = (tree ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "\n{} files, {:.1} MiB in {secs:.2} s ({:.0} MiB/s), {failed} skipped; tree fingerprint {tree:016x}",
        hashes.len(),
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / (1 << 20) as f64 / secs
    );
    Ok(())
}

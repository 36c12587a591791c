//! Aggregation throughput: folding updates into the fixed-point running sum, against a plain
//! streaming f32 sum over the same bytes, in the same run.
//!
//! `cargo bench -p fedtune-coordinator --bench aggregation [-- VALUES]` (default 22.7M values, a
//! BERT-mini-sized full update of 91 MB). Prints GB/s of update bytes folded and the ratios.

use std::io::Read;
use std::path::Path;

use fedtune_coordinator::aggregate::FixedPointSum;
use tokio::time::Instant;

const ROUNDS: usize = 5;

fn write_update(path: &Path, n: usize, seed: u32) -> Vec<f32> {
    let values: Vec<f32> = (0..n)
        .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 20001) as f32 * 1e-6 - 0.01)
        .collect();
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).expect("write update");
    values
}

/// The reference: read the same file in the same 4 MiB blocks and add into an f32 vector.
fn plain_f32_sum(path: &Path, acc: &mut [f32]) {
    let mut f = std::fs::File::open(path).expect("open");
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0;
    loop {
        let k = f.read(&mut buf).expect("read");
        if k == 0 {
            break;
        }
        for (a, b) in acc[at..at + k / 4].iter_mut().zip(buf[..k].chunks_exact(4)) {
            *a += f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        at += k / 4;
    }
}

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn best<F: FnMut()>(mut f: F) -> f64 {
    (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(22_700_000);
    let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("update.bin");
    let values = write_update(&path, n, 7);
    let bytes = n * 4;
    println!(
        "aggregation: {n} values ({:.1} MB per update), {cores} cores, best of {ROUNDS}",
        bytes as f64 / 1e6
    );

    let mut acc = vec![0f32; n];
    let plain_file = best(|| plain_f32_sum(&path, &mut acc));
    std::hint::black_box(&acc);
    let mut sum = FixedPointSum::new(n);
    // One sum for every fold, as in a round (its pages are touched once, up front).
    sum.fold_values(&values, 1, 1.0);
    let fold_file_1 = best(|| sum.fold_file(&path, 3, 1.0, 1).expect("fold"));
    let fold_file_n = best(|| sum.fold_file(&path, 3, 1.0, cores).expect("fold"));
    std::hint::black_box(sum.raw());
    let plain_mem = best(|| {
        for (a, v) in acc.iter_mut().zip(&values) {
            *a += v;
        }
    });
    std::hint::black_box(&acc);
    let fold_mem = best(|| sum.fold_values(&values, 3, 1.0));
    std::hint::black_box(sum.raw());

    println!("  plain streaming f32 sum, from file          {:>7.2} GB/s", gbps(bytes, plain_file));
    println!(
        "  fixed-point fold, from spool file, 1 thread  {:>7.2} GB/s  ({:.2}× the plain sum)",
        gbps(bytes, fold_file_1),
        plain_file / fold_file_1
    );
    println!(
        "  fixed-point fold, from spool file, {cores} threads {:>6.2} GB/s  ({:.2}× the plain sum)",
        gbps(bytes, fold_file_n),
        plain_file / fold_file_n
    );
    println!("  plain f32 add, in memory                    {:>7.2} GB/s", gbps(bytes, plain_mem));
    println!(
        "  fixed-point fold, in memory, 1 thread        {:>7.2} GB/s  ({:.2}× the plain add)",
        gbps(bytes, fold_mem),
        plain_mem / fold_mem
    );
}

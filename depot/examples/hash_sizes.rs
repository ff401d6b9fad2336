//! Raw BLAKE3 throughput by input size (how much per-chunk verification costs):
//! `cargo run --release --example hash_sizes`.
use std::time::Instant;

fn main() {
    let data: Vec<u8> = (0..256u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let t = Instant::now();
    std::hint::black_box(blake3::hash(&data));
    let whole = t.elapsed().as_secs_f64();
    println!("whole: {:.0} MB/s", data.len() as f64 / whole / 1e6);
    let cuts =
        viola_depot::chunker::boundaries(viola_depot::chunker::ChunkerSpec::default(), &data)
            .expect("spec");
    let t = Instant::now();
    for &(o, l) in &cuts {
        std::hint::black_box(blake3::hash(&data[o as usize..o as usize + l]));
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "CDC pieces ({}): {:.0} MB/s ({:.2} of whole)",
        cuts.len(),
        data.len() as f64 / s / 1e6,
        whole / s
    );
    let t = Instant::now();
    for &(o, l) in &cuts {
        std::hint::black_box(viola_depot::hash::Hash::of(
            &data[o as usize..o as usize + l],
        ));
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "CDC pieces via Hash::of: {:.0} MB/s ({:.2} of whole)",
        data.len() as f64 / s / 1e6,
        whole / s
    );
    for kib in [16usize, 64, 100, 256, 1024] {
        let t = Instant::now();
        for c in data.chunks(kib * 1024) {
            std::hint::black_box(blake3::hash(c));
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "{kib:>5} KiB pieces: {:.0} MB/s ({:.2} of whole)",
            data.len() as f64 / s / 1e6,
            whole / s
        );
    }
}

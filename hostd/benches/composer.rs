//! Composer latency over the whole corpus: `cargo bench -p genos-hostd --bench composer`.
//!
//! Prints p50/p99/max per request, and the same for a baseline measured in the same run
//! (lowercasing and splitting the request into words, the least any parser must do), so
//! the figures can be read as ratios on any machine. Target: p99 <= 1 ms.

use std::time::{Duration, Instant};

use hostd::composer::{Composer, Defaults};
use proto::spec::Catalog;

#[derive(serde::Deserialize)]
struct Corpus {
    case: Vec<Case>,
}
#[derive(serde::Deserialize)]
struct Case {
    text: String,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/composer-corpus.toml");
    let corpus: Corpus =
        toml::from_str(&std::fs::read_to_string(path).expect("corpus")).expect("corpus parses");
    let texts: Vec<String> = corpus.case.into_iter().map(|c| c.text).collect();
    let composer = Composer::new(Catalog::embedded(), Defaults::default());
    const ROUNDS: usize = 20;

    let mut compose = Vec::with_capacity(texts.len() * ROUNDS);
    let mut baseline = Vec::with_capacity(texts.len() * ROUNDS);
    for _ in 0..ROUNDS {
        for t in &texts {
            let start = Instant::now();
            std::hint::black_box(composer.compose(std::hint::black_box(t)));
            compose.push(start.elapsed());
            let start = Instant::now();
            let lower = std::hint::black_box(t).to_lowercase();
            std::hint::black_box(lower.split_whitespace().collect::<Vec<_>>());
            baseline.push(start.elapsed());
        }
    }
    compose.sort();
    baseline.sort();
    println!(
        "composer latency over {} requests x {ROUNDS} rounds",
        texts.len()
    );
    println!("{:<22} {:>10} {:>10} {:>10}", "", "p50", "p99", "max");
    for (name, v) in [("compose", &compose), ("baseline (split)", &baseline)] {
        println!(
            "{name:<22} {:>10.1?} {:>10.1?} {:>10.1?}",
            percentile(v, 0.5),
            percentile(v, 0.99),
            v[v.len() - 1]
        );
    }
    let ratio =
        percentile(&compose, 0.99).as_secs_f64() / percentile(&baseline, 0.99).as_secs_f64();
    println!(
        "p99 compose / baseline: {ratio:.0}x; target p99 <= 1 ms: {}",
        if percentile(&compose, 0.99) <= Duration::from_millis(1) {
            "met"
        } else {
            "NOT met"
        }
    );
}

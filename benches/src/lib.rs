//! Criterion micro-benchmarks of meshd's hot paths live in `benches/benches/`; this library is
//! empty and only gives the bench targets a package. Run `cargo bench -p meshd-benches`.

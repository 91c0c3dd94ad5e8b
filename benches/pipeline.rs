//! Placeholder replaced by the pipeline benchmarks.
fn main() {}

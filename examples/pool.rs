//! The least-connections balancer on its own: pick a backend, hold the lease while the work runs,
//! drop it when done. `cargo run --example pool`.

use std::time::Instant;

use fulcrum::balancer::Pool;

fn main() {
    let backends = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"];
    let pool = Pool::new(backends.len());

    // A long-lived connection holds backend 0...
    let long_lived = pool.pick(&[], Instant::now()).expect("pool is not empty");
    println!("long-lived connection -> {}", backends[long_lived.index()]);

    // ...so short ones alternate between the other two until it ends.
    for _ in 0..4 {
        let lease = pool.pick(&[], Instant::now()).expect("pool is not empty");
        println!("short connection -> {}", backends[lease.index()]);
    } // each lease is dropped here, giving its count back

    println!("active: {:?}", pool.active_all());
    drop(long_lived);
    println!("active after close: {:?}", pool.active_all());
}

//! Without `proc::init()` in `main`, a `Spawn` start is a clear error that
//! names the fix (the child would otherwise run the whole program again).

mod common;

use proc::{Builder, SpawnError, StartMethod};

fn main() {
    common::run(&[(
        "spawn_without_init_is_refused",
        10,
        spawn_without_init_is_refused,
    )]);
}

fn spawn_without_init_is_refused() {
    let err = Builder::new()
        .start_method(StartMethod::Spawn)
        .spawn_entry(|x: u8| x, 1)
        .expect_err("refused");
    assert!(matches!(err, SpawnError::InitMissing), "{err:?}");
    assert!(err.to_string().contains("proc::init()"), "{err}");
}

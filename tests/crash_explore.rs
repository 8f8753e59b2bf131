//! The crash-state explorer's sweeps (see tests/explore): each family of
//! workloads, every crash state the device model allows at its flushes,
//! checked against the workload's own oracle.
//!
//! `EXPLORE_LONG=1` runs the long sweep (scripts/crash-explore --long);
//! `EXPLORE_REPLAY=family/seed/index` checks one state and says why it
//! fails (scripts/crash-explore --replay ID).

mod common;
mod explore;

use explore::{Scale, Tally};

fn long() -> bool {
    std::env::var_os("EXPLORE_LONG").is_some()
}

fn scale() -> Scale {
    if long() {
        Scale::LONG
    } else {
        Scale::CI
    }
}

/// Seeds per family: (CI, long).
fn seeds(ci: u64, long_run: u64) -> std::ops::Range<u64> {
    let n = if long() { long_run } else { ci };
    let first: u64 = std::env::var("EXPLORE_FIRST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    first..first + n
}

fn assert_clean(t: Tally) {
    assert!(t.states > 0, "no crash state was tried");
    assert_eq!(
        t.failed,
        0,
        "{} of {} crash states failed; first: {}",
        t.failed,
        t.states,
        t.first_failure.unwrap_or_default()
    );
}

#[test]
fn explore_replay_one_state() {
    let Ok(id) = std::env::var("EXPLORE_REPLAY") else {
        println!("SKIP: set EXPLORE_REPLAY=family/seed/index (scripts/crash-explore --replay ID)");
        return;
    };
    match explore::replay(&id, scale()) {
        Ok(()) => println!("state {id}: passes"),
        Err(e) => panic!("state {id}: {e}"),
    }
}

#[test]
fn explore_random_workloads_of_every_operation() {
    assert_clean(explore::sweep("ace", seeds(120, 1400), scale()));
}

#[test]
fn explore_names_of_every_length_in_one_commit() {
    assert_clean(explore::sweep("names", seeds(8, 100), scale()));
}

#[test]
fn explore_a_directory_of_many_entries_in_one_commit() {
    assert_clean(explore::sweep("bigdir", seeds(1, 4), scale()));
}

#[test]
fn explore_writes_held_in_the_write_back_cache() {
    assert_clean(explore::sweep("wb", seeds(24, 400), scale()));
}

#[test]
fn explore_the_log_wrapping_into_a_checkpoint() {
    assert_clean(explore::sweep("wrap", seeds(1, 10), scale()));
}

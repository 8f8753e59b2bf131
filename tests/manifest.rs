//! tests/cases (the case list of scripts/check) names every #[test] of
//! the integration tests exactly once, and nothing else.

use std::collections::BTreeSet;
use std::path::Path;

#[test]
fn every_test_is_a_case_and_every_case_a_test() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut tests = BTreeSet::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "rs") || p.file_stem().unwrap() == "manifest" {
            continue;
        }
        let bin = p.file_stem().unwrap().to_string_lossy().into_owned();
        let src = std::fs::read_to_string(&p).unwrap();
        let mut lines = src.lines();
        while let Some(l) = lines.next() {
            if l.trim() == "#[test]" {
                let f = lines.next().unwrap().trim();
                let name = f.trim_start_matches("fn ").split('(').next().unwrap();
                tests.insert(format!("{bin}::{name}"));
            }
        }
    }
    let cases = std::fs::read_to_string(dir.join("cases")).unwrap();
    let mut listed = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for l in cases
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let f: Vec<&str> = l.splitn(4, ' ').collect();
        assert_eq!(f.len(), 4, "malformed case line: {l}");
        assert!(ids.insert(f[0].to_string()), "duplicate case id {}", f[0]);
        assert!(
            f[1].split(',').any(|g| g == "auto"),
            "case {} is not in group auto",
            f[0]
        );
        assert!(
            listed.insert(f[2].to_string()),
            "case {} listed twice",
            f[2]
        );
    }
    let missing: Vec<_> = tests.difference(&listed).collect();
    let stale: Vec<_> = listed.difference(&tests).collect();
    assert!(missing.is_empty(), "tests not in tests/cases: {missing:?}");
    assert!(stale.is_empty(), "cases with no test: {stale:?}");
}

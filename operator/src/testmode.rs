//! Test only: running chosen replicas in one of the replica binary's Byzantine modes, so that an
//! end-to-end test can check that clients stay correct and that the status names the replica.
//!
//! Asked for with the annotation `kmmr.io/byzantine-test-mode: "<id>=<mode>[,<id>=<mode>]"` on a
//! BftCluster, and honoured only by an operator started with `--allow-byzantine-test-modes`
//! (the chart's `testing.allowByzantineModes`, off by default). Anywhere else the annotation is
//! refused with an error saying so: a production cluster must never be talked into attacking
//! itself by an annotation. At most f replicas, each a member, each mode one the binary knows.

use std::collections::BTreeMap;

/// The annotation naming the replicas to run Byzantine and their modes.
pub const ANNOTATION: &str = "kmmr.io/byzantine-test-mode";

/// The modes of `kmmr-replica run --byzantine`.
pub const MODES: [&str; 8] = [
    "equivocate",
    "corrupt",
    "silent",
    "slow",
    "garbage",
    "forge",
    "replay",
    "mixed",
];

/// Replica id -> mode, from the annotation's value, checked against the view's members and f.
pub fn parse(value: &str, members: &[i32], f: i32) -> Result<BTreeMap<i32, String>, String> {
    let mut modes = BTreeMap::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, mode) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not <replica id>=<mode>, e.g. 2=corrupt"))?;
        let id: i32 = id
            .trim()
            .parse()
            .map_err(|_| format!("{:?} in {part:?} is not a replica id", id.trim()))?;
        let mode = mode.trim().to_ascii_lowercase();
        if !MODES.contains(&mode.as_str()) {
            return Err(format!(
                "unknown mode {mode:?} for replica {id}; the modes are {}",
                MODES.join(", ")
            ));
        }
        if !members.contains(&id) {
            return Err(format!(
                "replica {id} is not a member of the view (members: {members:?})"
            ));
        }
        if modes.insert(id, mode).is_some() {
            return Err(format!("replica {id} is named twice"));
        }
    }
    if modes.len() as i32 > f {
        return Err(format!(
            "{} replicas named but the view tolerates only f = {f} faulty ones: more would break the cluster's guarantees, not test them",
            modes.len()
        ));
    }
    Ok(modes)
}

/// The modes to run, or why the annotation is refused.
pub fn requested(
    annotation: Option<&str>,
    allowed: bool,
    members: &[i32],
    f: i32,
) -> Result<BTreeMap<i32, String>, String> {
    let Some(value) = annotation.filter(|v| !v.trim().is_empty()) else {
        return Ok(BTreeMap::new());
    };
    if !allowed {
        return Err(format!(
            "the annotation {ANNOTATION}={value:?} asks for replicas that attack their own cluster, which only an operator started with the test-only flag --allow-byzantine-test-modes (chart value testing.allowByzantineModes=true) does; nothing was changed. Remove the annotation"
        ));
    }
    parse(value, members, f).map_err(|e| format!("annotation {ANNOTATION}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_parsed_and_checked() {
        let m = parse(" 2=Corrupt , 5=silent", &[0, 1, 2, 3, 4, 5, 6], 2).unwrap();
        assert_eq!(
            m,
            BTreeMap::from([(2, "corrupt".to_string()), (5, "silent".to_string())])
        );
        for (bad, needle) in [
            ("2", "is not <replica id>=<mode>"),
            ("x=corrupt", "not a replica id"),
            ("2=lying", "unknown mode"),
            ("9=corrupt", "not a member"),
            ("1=corrupt,1=slow", "named twice"),
            ("1=corrupt,2=slow", "tolerates only f = 1"),
        ] {
            let err = parse(bad, &[0, 1, 2, 3], 1).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn the_annotation_is_refused_unless_the_operator_allows_test_modes() {
        assert!(requested(None, false, &[0, 1, 2, 3], 1).unwrap().is_empty());
        let err = requested(Some("1=mixed"), false, &[0, 1, 2, 3], 1).unwrap_err();
        assert!(
            err.contains("--allow-byzantine-test-modes") && err.contains("Remove the annotation"),
            "{err}"
        );
        assert_eq!(
            requested(Some("1=mixed"), true, &[0, 1, 2, 3], 1).unwrap(),
            BTreeMap::from([(1, "mixed".to_string())])
        );
    }
}

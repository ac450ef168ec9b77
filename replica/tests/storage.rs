//! Tests of the replica's durable storage (`kmmr::storage`): the write-ahead log of decisions,
//! its recovery from torn and corrupted files, group commit, checkpoints and the persisted view.
//!
//! What is proven:
//!
//! * decisions appended across many segments come back identical and in order after a restart;
//! * a log cut at any byte of its last record recovers every complete record, and appending
//!   resumes after them;
//! * a flipped bit in a middle record stops recovery right before that record, reports it, and
//!   removes the later segments that would follow a hole;
//! * a leftover temporary checkpoint is ignored and removed; a damaged newest checkpoint falls
//!   back to the older one, and the log still replays on top of it;
//! * recovery returns the decision at the checkpoint's CID beside the checkpoint (a restarted
//!   replica's proof of where it stands);
//! * `truncate_log_before` removes only segments whose every decision precedes the CID;
//! * group commit reports durable CIDs in increasing order, up to the last one appended;
//! * `appends_per_second_with_group_commit_and_with_fsync_per_record` prints a measurement.
//!
//! Every test works in its own directory under `std::env::temp_dir()`, removed at the end.

// The helpers below are test code too; clippy.toml's test allowance covers only #[test] fns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kmmr::storage::{Damage, Storage, StorageConfig, StorageError, SyncMode, CHECKPOINTS_KEPT};
use kmmr_protocol::crypto::{Digest, PublicKey, Signature};
use kmmr_protocol::view::{Member, View};
use kmmr_protocol::wire::codec::Encode;
use kmmr_protocol::wire::ids::{Cid, Regency, ReplicaId, ViewId};
use kmmr_protocol::wire::messages::{Batch, Decision, Proof, Request, RequestKind, SignedRequest};

/// A directory unique to one test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "kmmr-storage-{test}-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn view() -> View {
    let members = (0..4u32)
        .map(|i| Member {
            id: ReplicaId(i),
            address: format!("127.0.0.1:{}", 7000 + i),
            key: PublicKey([i as u8 + 1; 32]),
        })
        .collect();
    View::new(ViewId(3), 1, members).unwrap()
}

/// A decision whose batch holds one request of `payload` bytes, with a 3-signature proof.
fn decision(cid: u64, payload: usize) -> Decision {
    let request = Request {
        client: PublicKey([9; 32]),
        session: 1,
        sequence: cid,
        kind: RequestKind::Ordered,
        view: ViewId(3),
        payload: (0..payload).map(|i| (i as u64 ^ cid) as u8).collect(),
    };
    Decision {
        cid: Cid(cid),
        batch: Batch {
            timestamp_ms: 1_700_000_000_000 + cid,
            nonce: cid.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            requests: vec![SignedRequest {
                request,
                signature: Signature([7; 64]),
            }],
        },
        proof: Proof {
            epoch: Regency(0),
            accepts: (0..3u32)
                .map(|i| (ReplicaId(i), Signature([i as u8; 64])))
                .collect(),
        },
    }
}

fn config(segment_bytes: u64) -> StorageConfig {
    StorageConfig {
        segment_bytes,
        ..StorageConfig::default()
    }
}

/// Opens `dir`, appends `cids` (each with `payload` bytes), syncs and closes.
fn write_log(dir: &Path, cfg: StorageConfig, cids: std::ops::Range<u64>, payload: usize) {
    let (mut s, _) = Storage::open(dir, cfg).unwrap();
    for c in cids {
        s.append(&decision(c, payload)).unwrap();
    }
    s.sync().unwrap();
}

fn cids(ds: &[Decision]) -> Vec<u64> {
    ds.iter().map(|d| d.cid.0).collect()
}

fn flip_bit(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x10;
    fs::write(path, bytes).unwrap();
}

/// Encoded size of a record for `decision(cid, payload)`: length, checksum, payload.
fn record_len(cid: u64, payload: usize) -> u64 {
    12 + decision(cid, payload).to_bytes().len() as u64
}

#[test]
fn decisions_round_trip_across_segments_and_appending_resumes_after_them() {
    let dir = TempDir::new("round-trip");
    write_log(dir.path(), config(4096), 0..60, 1024);

    let (mut s, rec) = Storage::open(dir.path(), config(4096)).unwrap();
    assert!(rec.report.is_clean(), "{:?}", rec.report);
    assert!(rec.checkpoint.is_none());
    let expected: Vec<Decision> = (0..60).map(|c| decision(c, 1024)).collect();
    assert_eq!(rec.decisions, expected);
    assert_eq!(rec.next_cid(), Cid(60));
    let segments = s.segments();
    assert!(segments.len() >= 15, "{} segments", segments.len());
    // Segments are named by their first CID and hold consecutive ranges.
    assert_eq!(segments[0].0, Cid(0));
    assert!(segments.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(s.durable_cid(), Some(Cid(59)));

    s.append(&decision(60, 0)).unwrap();
    let read: Vec<u64> = s.read_log(Cid(55)).map(|d| d.unwrap().cid.0).collect();
    assert_eq!(read, (55..=60).collect::<Vec<_>>());
    s.sync().unwrap();
    drop(s);

    let (_, rec) = Storage::open(dir.path(), config(4096)).unwrap();
    assert_eq!(cids(&rec.decisions), (0..=60).collect::<Vec<_>>());
}

#[test]
fn appends_out_of_order_are_refused() {
    let dir = TempDir::new("out-of-order");
    let (mut s, _) = Storage::open(dir.path(), config(1 << 20)).unwrap();
    s.append(&decision(5, 0)).unwrap();
    let e = s.append(&decision(7, 0)).unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::OutOfOrder {
                expected: Cid(6),
                got: Cid(7)
            }
        ),
        "{e}"
    );
    let e = s.append(&decision(5, 0)).unwrap_err();
    assert_eq!(e.reason(), "out_of_order");
    s.append(&decision(6, 0)).unwrap();
}

#[test]
fn a_log_cut_at_any_byte_of_its_last_record_recovers_every_complete_record() {
    let dir = TempDir::new("torn-tail");
    write_log(dir.path(), config(1 << 20), 0..5, 0);
    let segment = dir.path().join(format!("wal-{:020}.log", 0));
    let full = fs::read(&segment).unwrap();
    let last = record_len(4, 0);
    let start = full.len() as u64 - last;

    for cut in start..full.len() as u64 {
        fs::write(&segment, &full[..cut as usize]).unwrap();
        let (mut s, rec) = Storage::open(dir.path(), config(1 << 20)).unwrap();
        assert_eq!(cids(&rec.decisions), vec![0, 1, 2, 3], "cut at {cut}");
        if cut == start {
            assert!(rec.report.log_damage.is_none(), "cut at a record boundary");
        } else {
            let d = rec.report.log_damage.as_ref().unwrap();
            assert_eq!(d.offset, start, "cut at {cut}");
            assert_eq!(d.dropped_bytes, cut - start);
            assert!(d.dropped_segments.is_empty());
        }
        assert_eq!(
            fs::metadata(&segment).unwrap().len(),
            start,
            "torn tail truncated"
        );
        // The log takes the lost decision again, right where it was.
        assert_eq!(s.next_cid(), Some(Cid(4)));
        s.append(&decision(4, 0)).unwrap();
        s.sync().unwrap();
        drop(s);
        let (_, rec) = Storage::open(dir.path(), config(1 << 20)).unwrap();
        assert_eq!(cids(&rec.decisions), vec![0, 1, 2, 3, 4]);
        assert!(rec.report.is_clean());
    }
    assert_eq!(fs::read(&segment).unwrap(), full);
}

#[test]
fn a_torn_segment_header_is_dropped_and_recovery_keeps_the_earlier_segments() {
    let dir = TempDir::new("torn-header");
    // One record per segment.
    write_log(dir.path(), config(64), 0..3, 0);
    let third = dir.path().join(format!("wal-{:020}.log", 2));
    for cut in 0..24u64 {
        let f = OpenOptions::new().write(true).open(&third).unwrap();
        f.set_len(cut).unwrap();
        drop(f);
        let (s, rec) = Storage::open(dir.path(), config(64)).unwrap();
        assert_eq!(cids(&rec.decisions), vec![0, 1]);
        let d = rec.report.log_damage.unwrap();
        assert_eq!(d.damage, Damage::TornHeader);
        assert!(!third.exists());
        assert_eq!(s.segments().len(), 2);
        drop(s);
        // Recreate the third segment for the next cut.
        let (mut s, _) = Storage::open(dir.path(), config(64)).unwrap();
        s.append(&decision(2, 0)).unwrap();
        s.sync().unwrap();
    }
}

#[test]
fn a_flipped_bit_in_a_middle_record_stops_recovery_there_and_reports_it() {
    let dir = TempDir::new("bit-flip");
    write_log(dir.path(), config(1 << 20), 0..5, 100);
    let segment = dir.path().join(format!("wal-{:020}.log", 0));
    let len = fs::metadata(&segment).unwrap().len();
    let rec2 = 24 + record_len(0, 100) + record_len(1, 100);
    // A bit in the payload of record 2.
    flip_bit(&segment, rec2 + 12 + 40);

    let (s, rec) = Storage::open(dir.path(), config(1 << 20)).unwrap();
    assert_eq!(cids(&rec.decisions), vec![0, 1]);
    let d = rec.report.log_damage.unwrap();
    assert_eq!(d.damage, Damage::Checksum);
    assert_eq!(d.offset, rec2);
    assert_eq!(d.dropped_bytes, len - rec2);
    assert_eq!(s.next_cid(), Some(Cid(2)));
}

#[test]
fn a_flipped_bit_in_a_record_length_or_checksum_is_caught_too() {
    for (name, at) in [("length", 1u64), ("checksum", 6)] {
        let dir = TempDir::new(&format!("bit-flip-{name}"));
        write_log(dir.path(), config(1 << 20), 0..5, 100);
        let segment = dir.path().join(format!("wal-{:020}.log", 0));
        let rec2 = 24 + record_len(0, 100) + record_len(1, 100);
        flip_bit(&segment, rec2 + at);
        let (_, rec) = Storage::open(dir.path(), config(1 << 20)).unwrap();
        assert_eq!(cids(&rec.decisions), vec![0, 1], "{name}");
        assert_eq!(rec.report.log_damage.unwrap().offset, rec2, "{name}");
    }
}

#[test]
fn a_flipped_bit_in_a_middle_segment_removes_the_segments_after_the_hole() {
    let dir = TempDir::new("bit-flip-segments");
    let one = record_len(0, 100);
    // Two records per segment: 0-1, 2-3, 4-5, 6-7, 8-9.
    let cfg = || config(24 + 2 * one);
    write_log(dir.path(), cfg(), 0..10, 100);
    let (s, _) = Storage::open(dir.path(), cfg()).unwrap();
    let segments = s.segments();
    drop(s);
    assert_eq!(segments.len(), 5);
    assert_eq!(segments[2].0, Cid(4));
    // Damage record 5, the second record of the third segment.
    flip_bit(&segments[2].1, 24 + one + 30);

    let (s, rec) = Storage::open(dir.path(), cfg()).unwrap();
    assert_eq!(cids(&rec.decisions), vec![0, 1, 2, 3, 4]);
    let d = rec.report.log_damage.unwrap();
    assert_eq!(d.segment, segments[2].1);
    assert_eq!(d.offset, 24 + one);
    assert_eq!(
        d.dropped_segments,
        vec![segments[3].1.clone(), segments[4].1.clone()]
    );
    assert_eq!(s.segments().len(), 3);
    assert_eq!(s.next_cid(), Some(Cid(5)));
}

#[test]
fn garbage_files_never_panic_recovery() {
    let dir = TempDir::new("garbage");
    fs::write(
        dir.path().join(format!("wal-{:020}.log", 0)),
        [0xffu8; 1000],
    )
    .unwrap();
    fs::write(
        dir.path().join(format!("checkpoint-{:020}.ckpt", 3)),
        [0xffu8; 1000],
    )
    .unwrap();
    fs::write(dir.path().join("view"), b"not a view").unwrap();
    let (mut s, rec) = Storage::open(dir.path(), config(1 << 20)).unwrap();
    assert!(rec.decisions.is_empty() && rec.checkpoint.is_none() && rec.view.is_none());
    assert_eq!(rec.report.log_damage.unwrap().damage, Damage::BadHeader);
    assert_eq!(rec.report.rejected_checkpoints.len(), 1);
    assert!(rec.report.view_error.is_some());
    s.append(&decision(0, 0)).unwrap();
}

#[test]
fn a_leftover_temporary_checkpoint_is_ignored_and_removed() {
    let dir = TempDir::new("ckpt-temp");
    let v = view();
    {
        let (mut s, _) = Storage::open(dir.path(), config(1 << 20)).unwrap();
        let snap = b"state at 10".to_vec();
        s.write_checkpoint(Cid(10), &v, &snap, Digest::of(&snap))
            .unwrap();
    }
    // A crash in the middle of writing the checkpoint at 20.
    let temp = dir.path().join(format!("checkpoint-{:020}.ckpt.tmp", 20));
    fs::write(&temp, b"half a checkpoint").unwrap();

    let (s, rec) = Storage::open(dir.path(), config(1 << 20)).unwrap();
    let c = rec.checkpoint.unwrap();
    assert_eq!(c.cid, Cid(10));
    assert_eq!(c.snapshot, b"state at 10");
    assert_eq!(c.view, v);
    assert_eq!(rec.report.removed_temp_files, vec![temp.clone()]);
    assert!(!temp.exists());
    assert_eq!(s.checkpoint_cids().unwrap(), vec![Cid(10)]);
}

#[test]
fn a_damaged_newest_checkpoint_falls_back_to_the_older_and_the_log_replays_on_it() {
    let dir = TempDir::new("ckpt-fallback");
    let v = view();
    let snap = |c: u64| format!("state after {c}").into_bytes().repeat(100);
    {
        let (mut s, _) = Storage::open(dir.path(), config(4096)).unwrap();
        for c in 0..40 {
            s.append(&decision(c, 200)).unwrap();
            if c % 10 == 9 {
                s.write_checkpoint(Cid(c), &v, &snap(c), Digest::of(&snap(c)))
                    .unwrap();
                // Keep the log back to the older retained checkpoint, as the node should.
                let oldest = s.checkpoint_cids().unwrap()[0];
                s.truncate_log_before(oldest.next()).unwrap();
            }
        }
        s.sync().unwrap();
        assert_eq!(s.checkpoint_cids().unwrap(), vec![Cid(29), Cid(39)]);
        assert_eq!(CHECKPOINTS_KEPT, 2);
        assert_eq!(s.load_latest_checkpoint().unwrap().unwrap().cid, Cid(39));
    }
    let newest = dir.path().join(format!("checkpoint-{:020}.ckpt", 39));
    let len = fs::metadata(&newest).unwrap().len();

    // A flipped bit in the snapshot, then a truncated file: both fall back to CID 29.
    for damage in ["flip", "truncate"] {
        let good = fs::read(&newest).unwrap();
        match damage {
            "flip" => flip_bit(&newest, len - 100),
            _ => fs::write(&newest, &good[..good.len() / 2]).unwrap(),
        }
        let (s, rec) = Storage::open(dir.path(), config(4096)).unwrap();
        let c = rec.checkpoint.unwrap();
        assert_eq!(c.cid, Cid(29), "{damage}");
        assert_eq!(c.snapshot, snap(29));
        assert_eq!(rec.report.rejected_checkpoints.len(), 1);
        assert_eq!(rec.report.rejected_checkpoints[0].path, newest);
        assert_eq!(cids(&rec.decisions), (30..40).collect::<Vec<_>>());
        assert_eq!(s.load_latest_checkpoint().unwrap().unwrap().cid, Cid(29));
        drop(s);
        fs::write(&newest, good).unwrap();
    }
}

/// The decision at the checkpoint's CID is what a restarted replica shows a new leader to prove
/// where it stands: recovery returns it beside the checkpoint, not among the decisions to replay.
#[test]
fn recovery_keeps_the_decision_at_the_checkpoints_cid_beside_it() {
    let dir = TempDir::new("ckpt-decision");
    let v = view();
    let snap = b"state after 19".repeat(50);
    {
        let (mut s, rec) = Storage::open(dir.path(), config(4096)).unwrap();
        assert!(rec.checkpoint_decision.is_none());
        for c in 0..25 {
            s.append(&decision(c, 100)).unwrap();
        }
        s.write_checkpoint(Cid(19), &v, &snap, Digest::of(&snap))
            .unwrap();
        s.sync().unwrap();
    }
    let (s, rec) = Storage::open(dir.path(), config(4096)).unwrap();
    assert_eq!(rec.checkpoint.unwrap().cid, Cid(19));
    assert_eq!(rec.checkpoint_decision, Some(decision(19, 100)));
    assert_eq!(cids(&rec.decisions), (20..25).collect::<Vec<_>>());
    drop(s);

    // Without a checkpoint there is no such decision: everything replays.
    let plain = TempDir::new("ckpt-decision-none");
    {
        let (mut s, _) = Storage::open(plain.path(), config(4096)).unwrap();
        for c in 0..5 {
            s.append(&decision(c, 100)).unwrap();
        }
        s.sync().unwrap();
    }
    let (_s, rec) = Storage::open(plain.path(), config(4096)).unwrap();
    assert!(rec.checkpoint_decision.is_none());
    assert_eq!(cids(&rec.decisions), (0..5).collect::<Vec<_>>());
}

#[test]
fn a_checkpoint_whose_digest_is_not_the_snapshots_is_refused() {
    let dir = TempDir::new("ckpt-digest");
    let (mut s, _) = Storage::open(dir.path(), config(1 << 20)).unwrap();
    let e = s
        .write_checkpoint(Cid(1), &view(), b"abc", Digest::of(b"abd"))
        .unwrap_err();
    assert_eq!(e.reason(), "digest_mismatch");
    assert!(s.checkpoint_cids().unwrap().is_empty());
}

#[test]
fn truncate_log_before_removes_only_segments_wholly_before_the_cid() {
    let dir = TempDir::new("truncate");
    let one = record_len(0, 50);
    // Three records per segment: [0,3) [3,6) [6,9) [9,12) [12,14).
    let cfg = || config(24 + 3 * one);
    let (mut s, _) = Storage::open(dir.path(), cfg()).unwrap();
    for c in 0..14 {
        s.append(&decision(c, 50)).unwrap();
    }
    let firsts = |s: &Storage| s.segments().iter().map(|(c, _)| c.0).collect::<Vec<_>>();
    assert_eq!(firsts(&s), vec![0, 3, 6, 9, 12]);

    assert!(s.truncate_log_before(Cid(2)).unwrap().is_empty());
    assert_eq!(firsts(&s), vec![0, 3, 6, 9, 12]);
    // CID 3 starts the second segment: the first holds only 0..=2.
    assert_eq!(s.truncate_log_before(Cid(3)).unwrap().len(), 1);
    assert_eq!(firsts(&s), vec![3, 6, 9, 12]);
    // CID 8 is inside [6,9): only [3,6) goes.
    assert_eq!(s.truncate_log_before(Cid(8)).unwrap().len(), 1);
    assert_eq!(firsts(&s), vec![6, 9, 12]);
    let read: Vec<u64> = s.read_log(Cid(8)).map(|d| d.unwrap().cid.0).collect();
    assert_eq!(read, (8..14).collect::<Vec<_>>());
    // The active segment stays while it holds a decision at or after the CID.
    assert_eq!(s.truncate_log_before(Cid(13)).unwrap().len(), 2);
    assert_eq!(firsts(&s), vec![12]);
    // What the log no longer holds is covered by a checkpoint.
    s.write_checkpoint(Cid(11), &view(), b"s", Digest::of(b"s"))
        .unwrap();
    s.sync().unwrap();
    drop(s);

    let (mut s, rec) = Storage::open(dir.path(), cfg()).unwrap();
    assert_eq!(cids(&rec.decisions), vec![12, 13]);
    // Past the end of the log (a transferred checkpoint at 99): the log restarts at 100.
    s.truncate_log_before(Cid(100)).unwrap();
    assert!(s.segments().is_empty());
    assert_eq!(s.next_cid(), Some(Cid(100)));
    assert!(s.append(&decision(14, 0)).is_err());
    s.append(&decision(100, 0)).unwrap();
    assert_eq!(firsts(&s), vec![100]);
}

#[test]
fn a_log_that_does_not_reach_the_checkpoint_is_reset() {
    let dir = TempDir::new("log-reset");
    {
        let (mut s, _) = Storage::open(dir.path(), config(1 << 20)).unwrap();
        for c in 0..5 {
            s.append(&decision(c, 0)).unwrap();
        }
        // A checkpoint installed by state transfer, far ahead of the log, without truncating.
        s.write_checkpoint(Cid(50), &view(), b"s", Digest::of(b"s"))
            .unwrap();
        s.sync().unwrap();
    }
    let (mut s, rec) = Storage::open(dir.path(), config(1 << 20)).unwrap();
    assert_eq!(rec.checkpoint.unwrap().cid, Cid(50));
    assert!(rec.decisions.is_empty());
    let reset = rec.report.log_reset.unwrap();
    assert_eq!(
        (reset.needed, reset.first, reset.end),
        (Cid(51), Cid(0), Cid(5))
    );
    assert_eq!(s.next_cid(), Some(Cid(51)));
    assert_eq!(s.durable_cid(), Some(Cid(50)));
    s.append(&decision(51, 0)).unwrap();
}

#[test]
fn the_view_is_persisted_and_loaded() {
    let dir = TempDir::new("view");
    let v = view();
    {
        let (mut s, rec) = Storage::open(dir.path(), config(1 << 20)).unwrap();
        assert!(rec.view.is_none());
        s.write_view(&v).unwrap();
    }
    let (_, rec) = Storage::open(dir.path(), config(1 << 20)).unwrap();
    assert_eq!(rec.view, Some(v));
    flip_bit(&dir.path().join("view"), 20);
    let (_, rec) = Storage::open(dir.path(), config(1 << 20)).unwrap();
    assert!(rec.view.is_none());
    assert!(rec.report.view_error.is_some());
}

#[test]
fn group_commit_reports_durable_cids_in_increasing_order() {
    let dir = TempDir::new("group-commit");
    let seen = Arc::new(Mutex::new(Vec::<Cid>::new()));
    let cb_seen = seen.clone();
    let cfg = StorageConfig {
        on_durable: Some(Arc::new(move |c| cb_seen.lock().unwrap().push(c))),
        ..config(1 << 16)
    };
    let (mut s, _) = Storage::open(dir.path(), cfg).unwrap();
    let watch = s.durable_watch();
    let waiter = std::thread::spawn(move || watch.wait_for(Cid(1999), Duration::from_secs(60)));
    for c in 0..2000 {
        s.append(&decision(c, 64)).unwrap();
        if let Some(d) = s.durable_cid() {
            assert!(d.0 <= c);
        }
    }
    assert_eq!(s.sync().unwrap(), Some(Cid(1999)));
    assert!(waiter.join().unwrap().unwrap());
    assert_eq!(s.durable_cid(), Some(Cid(1999)));
    let seen = seen.lock().unwrap().clone();
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert_eq!(seen.last(), Some(&Cid(1999)));
    println!(
        "group commit: 2000 appends made durable by {} fsync batches",
        seen.len()
    );
}

/// A group-commit window gathers decisions for an fsync, but never holds back one that enough
/// bytes are waiting behind, nor an explicit `sync`.
#[test]
fn the_group_window_ends_early_for_enough_bytes_and_for_sync() {
    let dir = TempDir::new("group-window-bytes");
    let cfg = StorageConfig {
        group_window: Duration::from_secs(60),
        group_bytes: 4096,
        ..config(1 << 16)
    };
    let (mut s, _) = Storage::open(dir.path(), cfg).unwrap();
    let watch = s.durable_watch();
    let start = std::time::Instant::now();
    s.append(&decision(0, 64)).unwrap();
    assert!(
        !watch.wait_for(Cid(0), Duration::from_millis(300)).unwrap(),
        "a small record waits for the window"
    );
    // The fourth of these takes the bytes waiting past 4096, so the window ends with at least
    // it written. Which of the later ones that fsync covers depends on when the commit thread
    // wakes; the ones it misses wait for the next window unless 4096 bytes gather behind them.
    for c in 1..=8 {
        s.append(&decision(c, 1024)).unwrap();
    }
    assert!(watch.wait_for(Cid(4), Duration::from_secs(10)).unwrap());
    // One record of the limit's size alone ends a window, whatever the split above was.
    s.append(&decision(9, 4096)).unwrap();
    assert!(watch.wait_for(Cid(9), Duration::from_secs(10)).unwrap());
    s.append(&decision(10, 64)).unwrap();
    assert_eq!(s.sync().unwrap(), Some(Cid(10)));
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "neither waited for the 60 s window: {:?}",
        start.elapsed()
    );
}

/// Appends per second of decisions with `payload`-byte requests for about `budget` (at most
/// 200,000), counted until all are durable; also the appends and the fsyncs that covered them.
fn measure(mode: SyncMode, payload: usize, budget: Duration) -> (f64, u64, usize) {
    let dir = TempDir::new(&format!("bench-{mode:?}-{payload}"));
    let batches = Arc::new(Mutex::new(0usize));
    let b = batches.clone();
    let cfg = StorageConfig {
        sync: mode,
        on_durable: Some(Arc::new(move |_| *b.lock().unwrap() += 1)),
        ..StorageConfig::default()
    };
    let (mut s, _) = Storage::open(dir.path(), cfg).unwrap();
    let template = decision(0, payload);
    let start = Instant::now();
    let mut n = 0u64;
    while n < 200_000 && start.elapsed() < budget {
        let mut d = template.clone();
        d.cid = Cid(n);
        s.append(&d).unwrap();
        n += 1;
    }
    s.sync().unwrap();
    let secs = start.elapsed().as_secs_f64();
    drop(s);
    let batches = *batches.lock().unwrap();
    (n as f64 / secs, n, batches)
}

#[test]
fn appends_per_second_with_group_commit_and_with_fsync_per_record() {
    // Informational: prints a measurement of this machine's disk, asserts only sanity.
    for payload in [0usize, 1024] {
        for mode in [SyncMode::Group, SyncMode::PerRecord] {
            let (rate, n, batches) = measure(mode, payload, Duration::from_millis(1500));
            println!(
                "storage bench: {mode:?} fsync, {payload}-byte requests ({} B records): \
                 {rate:.0} appends/s ({n} appends, {:.1} per fsync)",
                record_len(0, payload),
                n as f64 / batches.max(1) as f64
            );
            assert!(n > 0);
        }
    }
}

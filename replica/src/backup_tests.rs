use proptest::prelude::*;

use super::*;

fn backup(body: &[u8]) -> Backup {
    Backup::new(
        Header {
            service: ServiceKind::Kv,
            view_id: 3,
            cluster: Digest([7; 32]),
            cid: Some(41),
            revision: 12,
            keys: 5,
            vouchers: vec![1, 2],
            digest: Digest::of(body),
        },
        body.to_vec(),
    )
    .unwrap()
}

#[test]
fn a_backup_reads_back_as_written() {
    let b = backup(b"the state");
    assert_eq!(Backup::decode(&b.encode()).unwrap(), b);
    let mut none = b.clone();
    none.header.cid = None;
    none.header.vouchers.clear();
    assert_eq!(Backup::decode(&none.encode()).unwrap(), none);
}

#[test]
fn a_body_that_is_not_the_vouched_digest_is_not_a_backup() {
    let mut h = backup(b"x").header;
    h.digest = Digest::of(b"y");
    assert!(matches!(
        Backup::new(h, b"x".to_vec()),
        Err(FormatError::DigestMismatch { .. })
    ));
}

#[test]
fn every_flipped_byte_is_refused_with_what_is_wrong() {
    let file = backup(b"some state of a few bytes").encode();
    for i in 0..file.len() {
        let mut bad = file.clone();
        bad[i] ^= 0x40;
        let e = Backup::decode(&bad).expect_err("a flipped byte must be refused");
        // A flip in the magic says it is not a snapshot, in the version that the version is
        // unknown, in a length that the file is cut or too large; anywhere else the checksum.
        let expected = match i {
            0..=7 => matches!(e, FormatError::BadMagic),
            8..=9 => matches!(e, FormatError::UnsupportedVersion(_)),
            _ => matches!(
                e,
                FormatError::ChecksumMismatch
                    | FormatError::Truncated(_)
                    | FormatError::BodyTooLarge(_)
                    | FormatError::TrailingBytes(_)
            ),
        };
        assert!(expected, "byte {i}: {e}");
    }
}

#[test]
fn a_flip_in_the_body_is_a_checksum_mismatch() {
    let b = backup(b"0123456789");
    let mut file = b.encode();
    let body_at = file.len() - CHECKSUM_LEN - b.body.len();
    file[body_at + 3] ^= 1;
    let e = Backup::decode(&file).unwrap_err();
    assert_eq!(e, FormatError::ChecksumMismatch);
    assert!(e.to_string().contains("corrupted"), "{e}");
}

#[test]
fn every_truncation_is_refused() {
    let file = backup(b"state").encode();
    for len in 0..file.len() {
        let e = Backup::decode(&file[..len]).expect_err("a cut file must be refused");
        assert!(
            matches!(e, FormatError::BadMagic | FormatError::Truncated(_)),
            "cut at {len}: {e}"
        );
    }
    let mut longer = file.clone();
    longer.push(0);
    assert_eq!(
        Backup::decode(&longer).unwrap_err(),
        FormatError::TrailingBytes(1)
    );
}

#[test]
fn another_magic_or_version_is_refused_by_name() {
    let mut file = backup(b"s").encode();
    file[..8].copy_from_slice(b"SQLite f");
    assert!(Backup::decode(&file)
        .unwrap_err()
        .to_string()
        .contains("not a KmMR snapshot file"));
    let mut file = backup(b"s").encode();
    file[8..10].copy_from_slice(&2u16.to_le_bytes());
    assert_eq!(
        Backup::decode(&file).unwrap_err(),
        FormatError::UnsupportedVersion(2)
    );
}

#[test]
fn a_huge_length_field_is_refused_without_allocating_it() {
    let b = backup(b"s");
    let mut file = b.encode();
    let len_at = file.len() - CHECKSUM_LEN - 1 - 8;
    file[len_at..len_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(
        Backup::decode(&file).unwrap_err(),
        FormatError::BodyTooLarge(u64::MAX)
    );
}

#[test]
fn a_file_is_written_atomically_and_read_back() {
    let dir = std::env::temp_dir().join(format!("kmmr-backup-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("b.kmmr");
    let b = backup(b"written");
    b.write(&path).unwrap();
    assert_eq!(Backup::read(&path).unwrap(), b);
    assert!(!dir.join("b.kmmr.tmp").exists());
    std::fs::write(&path, b"short").unwrap();
    let e = Backup::read(&path).unwrap_err().to_string();
    assert!(
        e.contains("b.kmmr") && e.contains("not a KmMR snapshot"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_read_token_opens_only_that_replica_within_the_window() {
    let admin = KeyPair::from_seed([1; 32]);
    let pk = admin.public();
    let t = read_token(&admin, 2, 1_000_000);
    assert_eq!(check_token(Some(&pk), 2, 1_000_000, &t), Ok(()));
    assert_eq!(
        check_token(Some(&pk), 3, 1_000_000, &t),
        Err(TokenError::BadSignature)
    );
    assert_eq!(
        check_token(Some(&pk), 2, 1_000_000 + TOKEN_WINDOW_MS + 1, &t),
        Err(TokenError::Stale)
    );
    let other = KeyPair::from_seed([2; 32]);
    assert_eq!(
        check_token(Some(&pk), 2, 1_000_000, &read_token(&other, 2, 1_000_000)),
        Err(TokenError::BadSignature)
    );
    assert_eq!(
        check_token(None, 2, 1_000_000, &t),
        Err(TokenError::NoAdmin)
    );
    for bad in ["", ".", "x.y", "1.zz", "1.00"] {
        assert_eq!(
            check_token(Some(&pk), 2, 1, bad),
            Err(TokenError::Malformed)
        );
    }
}

#[test]
fn a_served_snapshot_splits_into_its_cid_and_state() {
    assert_eq!(
        decode_served(&encode_served(Some(9), b"abc")),
        Some((Some(9), &b"abc"[..]))
    );
    assert_eq!(
        decode_served(&encode_served(None, b"")),
        Some((None, &b""[..]))
    );
    assert_eq!(decode_served(&[2; 20]), None);
    assert_eq!(decode_served(&[1; 5]), None);
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Backup::decode(&bytes);
        let _ = decode_served(&bytes);
        let _ = check_token(Some(&PublicKey([0; 32])), 0, 0, &String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn decoding_a_mutated_backup_never_panics_and_never_yields_another_body(
        body in proptest::collection::vec(any::<u8>(), 0..64),
        at in any::<usize>(),
        byte in any::<u8>(),
        cut in any::<usize>(),
    ) {
        let b = backup(&body);
        let mut file = b.encode();
        let i = at % file.len();
        file[i] = byte;
        file.truncate(file.len() - cut % 3);
        if let Ok(d) = Backup::decode(&file) {
            // Only an unchanged file decodes.
            prop_assert_eq!(d, b);
        }
    }
}

//! Property tests of the object codec (kept apart from the codec's own tests, which the
//! encryption work changes): damaged objects, and forged ones whose header checksum was
//! recomputed, as whoever can write the bucket could. See `src/fuzz.rs` for the other parsers and
//! the counting allocator that measures the bound.

use proptest::prelude::*;
use walvault_wal::fuzzing::{config, damaged};

use super::codec::{encode_all, Compression, Decoder, HEADER_LEN, MAX_BLOCK};
use crate::fuzz::{peak_during, runtime};

/// A 64 KiB + 3 object, so it has two blocks, compressed or not.
fn object(compression: Compression) -> Vec<u8> {
    let content: Vec<u8> = (0..65_539u32)
        .map(|i| (i % 251) as u8 ^ (i >> 9) as u8)
        .collect();
    encode_all(compression, &content)
}

/// A forger who can write the bucket recomputes the header checksum after changing the header.
fn forged(mut bytes: Vec<u8>, reseal: bool) -> Vec<u8> {
    if reseal && bytes.len() >= HEADER_LEN {
        let crc = crc32fast::hash(&bytes[..16]);
        bytes[16..20].copy_from_slice(&crc.to_le_bytes());
    }
    bytes
}

/// Bound for one decoder: its two block buffers (stored and decompressed), each at most twice
/// [`MAX_BLOCK`] after `Vec` growth, whatever the object says; plus small change.
const DECODER_BOUND: usize = 4 * MAX_BLOCK + 64 * 1024;

/// A manifest is read whole: a forged one declaring more than the bound (and holding it,
/// compressed) is refused from its header by both readers, the catalog scan reporting it as
/// unreadable, and never held.
#[test]
fn a_forged_manifest_is_refused_before_it_is_read() {
    use crate::backup::catalog;
    use crate::repo::layout::BackupName;
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let repo = rt.block_on(super::local_for_tests(dir.path()));
    let name = BackupName::parse("base_20261130T080000Z_00000001_0000000003000028").unwrap();
    let path = dir.path().join(name.manifest_key());
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, encode_all(Compression::Lz4, &vec![b' '; 257 << 20])).unwrap();
    let (manifest, peak) = peak_during(|| rt.block_on(catalog::manifest(&repo, &name)));
    let e = manifest.unwrap_err().to_string();
    assert!(e.contains("declares"), "{e}");
    assert!(
        peak <= DECODER_BOUND,
        "reading the manifest held {peak} bytes"
    );
    let (scan, peak) = peak_during(|| rt.block_on(catalog::scan(&repo)));
    let (found, unreadable) = scan.unwrap();
    assert!(found.is_empty());
    assert!(
        unreadable.iter().any(|u| u.contains(&name.manifest_key())),
        "{unreadable:?}"
    );
    assert!(peak <= DECODER_BOUND, "the catalog scan held {peak} bytes");
}

proptest! {
    #![proptest_config(config(256))]

    /// The codec: damaged or forged objects are refused or decode to at most the declared
    /// length; a decoder never holds more than [`DECODER_BOUND`].
    #[test]
    fn codec_objects(
        bytes in prop_oneof![damaged(object(Compression::Lz4)), damaged(object(Compression::None))],
        reseal in any::<bool>(),
    ) {
        let bytes = forged(bytes, reseal);
        let rt = runtime();
        let (result, peak) = peak_during(|| rt.block_on(async {
            let mut decoder = Decoder::new(&bytes[..], "fuzz").await?;
            let declared = decoder.header().content_length;
            let mut total = 0u64;
            while let Some(block) = decoder.next_block().await? {
                total += block.len() as u64;
            }
            Ok::<_, crate::repo::codec::CodecError>((declared, total))
        }));
        prop_assert!(peak <= DECODER_BOUND, "decoder held {peak} bytes");
        if let Ok((declared, total)) = result {
            prop_assert_eq!(declared, total);
        }
    }

}

/// A forged identity object that declares (and holds, compressed) 64 MiB is refused from its
/// header: reading it holds no more than one decoder, not the 64 MiB.
#[test]
fn a_forged_identity_object_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let repo = rt.block_on(super::local_for_tests(dir.path()));
    let forged = encode_all(Compression::Lz4, &vec![b' '; 64 << 20]);
    std::fs::write(dir.path().join("repository"), forged).unwrap();
    let (loaded, peak) = peak_during(|| rt.block_on(super::identity::load(&repo)));
    assert!(loaded.is_err(), "a 64 MiB identity was accepted");
    assert!(
        peak <= DECODER_BOUND,
        "reading the identity held {peak} bytes"
    );
}

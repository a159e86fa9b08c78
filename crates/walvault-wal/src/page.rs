//! XLOG page headers: the 24-byte header on every WAL page and the 40-byte
//! long header on the first page of every segment.
//!
//! Understands `XLogPageHeaderData` and `XLogLongPageHeaderData` from
//! `xlog_internal.h` as laid out by a little-endian 64-bit server (MAXALIGN 8),
//! the `xlp_magic` of each supported major version, and the checks PostgreSQL
//! makes on a segment's first page. Used by `archive_command` handling to
//! refuse files that are not the segment their name claims, by restore to
//! vet what it serves, and by WAL reading to walk pages.

use std::fmt;

use crate::error::WalError;
use crate::lsn::Lsn;
use crate::name::{SegmentName, SegmentNo, WalFileName, WalSegmentSize};
use crate::timeline::TimelineId;

/// `SizeOfXLogShortPHD`: 20 bytes of fields, MAXALIGNed to 24.
pub const SIZE_OF_XLOG_SHORT_PHD: usize = 24;
/// `SizeOfXLogLongPHD`: the short header plus `xlp_sysid`, `xlp_seg_size`
/// and `xlp_xlog_blcksz`.
pub const SIZE_OF_XLOG_LONG_PHD: usize = 40;

/// The page begins with the rest of a record started on the previous page.
pub const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
/// The page has the long header; PostgreSQL sets it on each segment's first page.
pub const XLP_LONG_HEADER: u16 = 0x0002;
/// Full-page images of records starting on this page may be dropped (no
/// backup was running when the page was started).
pub const XLP_BKP_REMOVABLE: u16 = 0x0004;
/// The page replaces a contrecord lost at a crash (PostgreSQL 14, back-patched).
pub const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
/// `XLP_ALL_FLAGS`: any other bit means the page is not a valid header.
pub const XLP_ALL_FLAGS: u16 = 0x000F;

const MIN_BLOCK_SIZE: u32 = 1024;
const MAX_BLOCK_SIZE: u32 = 64 * 1024;

/// A PostgreSQL major version walvault reads WAL from, identified by the
/// `XLOG_PAGE_MAGIC` it writes: the magic changes whenever the WAL format
/// does, which in practice is every major release.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum PgMajor {
    /// PostgreSQL 13.
    V13,
    /// PostgreSQL 14.
    V14,
    /// PostgreSQL 15.
    V15,
    /// PostgreSQL 16.
    V16,
    /// PostgreSQL 17.
    V17,
    /// PostgreSQL 18.
    V18,
}

impl PgMajor {
    /// Every supported major, oldest first.
    pub const ALL: [PgMajor; 6] = [
        PgMajor::V13,
        PgMajor::V14,
        PgMajor::V15,
        PgMajor::V16,
        PgMajor::V17,
        PgMajor::V18,
    ];

    /// The major that writes `magic`, if it is one walvault supports.
    pub fn from_magic(magic: u16) -> Option<PgMajor> {
        PgMajor::ALL.into_iter().find(|m| m.magic() == magic)
    }

    /// `XLOG_PAGE_MAGIC` of this major (checked against each release's
    /// `xlog_internal.h`; 18 from REL_18_6).
    pub fn magic(self) -> u16 {
        match self {
            PgMajor::V13 => 0xD106,
            PgMajor::V14 => 0xD10D,
            PgMajor::V15 => 0xD110,
            PgMajor::V16 => 0xD113,
            PgMajor::V17 => 0xD116,
            PgMajor::V18 => 0xD118,
        }
    }

    /// The major version number, e.g. 16.
    pub fn number(self) -> u32 {
        match self {
            PgMajor::V13 => 13,
            PgMajor::V14 => 14,
            PgMajor::V15 => 15,
            PgMajor::V16 => 16,
            PgMajor::V17 => 17,
            PgMajor::V18 => 18,
        }
    }

    /// The major with this version number, if supported.
    pub fn from_number(number: u32) -> Option<PgMajor> {
        PgMajor::ALL.into_iter().find(|m| m.number() == number)
    }

    /// The major with this version number, or an error naming it and the supported range: a
    /// major walvault does not know (a future one) is refused rather than handled as the
    /// nearest one, since its WAL, control file and backup functions may differ.
    pub fn supported(number: u32) -> Result<PgMajor, WalError> {
        PgMajor::from_number(number).ok_or(WalError::UnsupportedMajor(number))
    }

    /// The oldest supported major.
    pub fn oldest() -> PgMajor {
        PgMajor::ALL[0]
    }

    /// The newest supported major.
    pub fn newest() -> PgMajor {
        PgMajor::ALL[PgMajor::ALL.len() - 1]
    }
}

impl fmt::Display for PgMajor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number())
    }
}

/// The header every WAL page starts with (`XLogPageHeaderData`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ShortPageHeader {
    /// `xlp_magic`.
    pub magic: u16,
    /// The major version the magic identifies.
    pub major: PgMajor,
    /// `xlp_info`: `XLP_*` flag bits.
    pub info: u16,
    /// `xlp_tli`: timeline of the first record on the page.
    pub tli: TimelineId,
    /// `xlp_pageaddr`: the LSN of the page's first byte.
    pub pageaddr: Lsn,
    /// `xlp_rem_len`: bytes of a record continued from the previous page.
    pub rem_len: u32,
}

impl ShortPageHeader {
    /// Whether the page carries the long header.
    pub fn is_long(&self) -> bool {
        self.info & XLP_LONG_HEADER != 0
    }

    /// Whether the page begins with the continuation of an earlier record.
    pub fn first_is_contrecord(&self) -> bool {
        self.info & XLP_FIRST_IS_CONTRECORD != 0
    }

    /// Where the page's data starts (`XLogPageHeaderSize`).
    pub fn header_size(&self) -> usize {
        if self.is_long() {
            SIZE_OF_XLOG_LONG_PHD
        } else {
            SIZE_OF_XLOG_SHORT_PHD
        }
    }
}

/// Parses the standard header at the start of any WAL page, checking the
/// magic and the info bits, as PostgreSQL does for every page it reads.
pub fn short_page_header(bytes: &[u8]) -> Result<ShortPageHeader, WalError> {
    let h = bytes
        .first_chunk::<SIZE_OF_XLOG_SHORT_PHD>()
        .ok_or(WalError::PageTooShort {
            len: bytes.len(),
            need: SIZE_OF_XLOG_SHORT_PHD,
        })?;
    // Offsets follow the C struct: u16 magic, u16 info, u32 tli, u64 pageaddr
    // at 8 (aligned), u32 rem_len at 16, 4 bytes of padding.
    let magic = u16::from_le_bytes([h[0], h[1]]);
    let info = u16::from_le_bytes([h[2], h[3]]);
    let tli = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let pageaddr = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    let rem_len = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);

    let major = PgMajor::from_magic(magic).ok_or(WalError::UnknownMagic(magic))?;
    if info & !XLP_ALL_FLAGS != 0 {
        return Err(WalError::BadPageInfo(info));
    }
    Ok(ShortPageHeader {
        magic,
        major,
        info,
        tli: TimelineId(tli),
        pageaddr: Lsn(pageaddr),
        rem_len,
    })
}

/// The header of a segment's first page (`XLogLongPageHeaderData`), which
/// identifies the cluster and the segment size the file was written with. As
/// in PostgreSQL, it embeds the standard header as `std`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct LongPageHeader {
    /// The standard header fields; `std.info` includes `XLP_LONG_HEADER`.
    pub std: ShortPageHeader,
    /// `xlp_sysid`: the cluster's system identifier from `pg_control`.
    pub system_identifier: u64,
    /// `xlp_seg_size`.
    pub seg_size: WalSegmentSize,
    /// `xlp_xlog_blcksz`: the WAL page size.
    pub block_size: u32,
}

impl LongPageHeader {
    /// Parses and sanity-checks the first 40 bytes of a segment.
    pub fn parse(bytes: &[u8]) -> Result<LongPageHeader, WalError> {
        let h = bytes
            .first_chunk::<SIZE_OF_XLOG_LONG_PHD>()
            .ok_or(WalError::PageTooShort {
                len: bytes.len(),
                need: SIZE_OF_XLOG_LONG_PHD,
            })?;
        let std = short_page_header(h)?;
        if !std.is_long() {
            return Err(WalError::NotLongHeader(std.info));
        }
        let system_identifier =
            u64::from_le_bytes([h[24], h[25], h[26], h[27], h[28], h[29], h[30], h[31]]);
        let seg_size = u32::from_le_bytes([h[32], h[33], h[34], h[35]]);
        let block_size = u32::from_le_bytes([h[36], h[37], h[38], h[39]]);

        let seg_size = WalSegmentSize::new(u64::from(seg_size))?;
        check_block_size(block_size)?;
        Ok(LongPageHeader {
            std,
            system_identifier,
            seg_size,
            block_size,
        })
    }
}

/// XLOG_BLCKSZ is a configure-time choice limited to powers of two from 1 to 64 KiB.
fn check_block_size(block_size: u32) -> Result<(), WalError> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(WalError::BadBlockSize(block_size));
    }
    Ok(())
}

/// Checks that a complete segment file is the segment `name` says it is:
/// a valid long header, a length equal to the header's segment size, a page
/// address equal to the segment's start, and a timeline no newer than the
/// name's. `first_page` must hold at least the file's first 40 bytes.
///
/// The header's timeline may be *older* than the name's: the first segment of
/// a new timeline is a copy of the parent's segment, whose pages keep the
/// parent's TLI up to the switch point.
pub fn validate_segment(
    name: &SegmentName,
    first_page: &[u8],
    file_len: u64,
) -> Result<LongPageHeader, WalError> {
    let file = WalFileName::Segment(*name).to_string();
    let header = validate_common(name, &file, first_page)?;
    if file_len != u64::from(header.seg_size.bytes()) {
        return Err(WalError::SegmentFileSize {
            file,
            found: file_len,
            expected: header.seg_size,
        });
    }
    Ok(header)
}

/// Like [`validate_segment`] for a `.partial` file, whose length may be
/// anything from its first page header up to a full segment. PostgreSQL and
/// `pg_receivewal` both leave full-size partials, but a streamer writing its
/// own may stop anywhere, so only the bounds are checked.
pub fn validate_partial(
    name: &SegmentName,
    first_page: &[u8],
    file_len: u64,
) -> Result<LongPageHeader, WalError> {
    let file = WalFileName::Partial(*name).to_string();
    let header = validate_common(name, &file, first_page)?;
    let min = SIZE_OF_XLOG_LONG_PHD as u64;
    if file_len < min || file_len > u64::from(header.seg_size.bytes()) {
        return Err(WalError::PartialFileSize {
            file,
            found: file_len,
            seg_size: header.seg_size,
        });
    }
    Ok(header)
}

fn validate_common(
    name: &SegmentName,
    file: &str,
    first_page: &[u8],
) -> Result<LongPageHeader, WalError> {
    let in_file = |problem: WalError| WalError::InFile {
        file: file.to_string(),
        problem: Box::new(problem),
    };
    let header = LongPageHeader::parse(first_page).map_err(in_file)?;
    // The header's own segment size decides how the name maps to an LSN:
    // the file must be self-consistent whatever walvault was configured with.
    let expected = name.start_lsn(header.seg_size).map_err(in_file)?;
    if header.std.pageaddr != expected {
        return Err(WalError::PageAddressMismatch {
            file: file.to_string(),
            found: header.std.pageaddr,
            expected,
        });
    }
    if header.std.tli > name.tli {
        return Err(WalError::TimelineFromFuture {
            file: file.to_string(),
            found: header.std.tli,
            name_tli: name.tli,
        });
    }
    Ok(header)
}

/// What every page header of one cluster's WAL says, whatever the page: the server's major
/// version (its magic), system identifier, segment size and WAL block size.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ClusterWal {
    /// The major version of the server writing the WAL.
    pub major: PgMajor,
    /// The cluster's system identifier.
    pub system_identifier: u64,
    /// The cluster's WAL segment size.
    pub seg_size: WalSegmentSize,
    /// `XLOG_BLCKSZ`, the WAL page size (`wal_block_size`).
    pub block_size: u32,
}

/// Checks WAL that arrives as consecutive byte ranges of one timeline (streaming replication)
/// before anything keeps it: each range must start where the previous one ended, and each page
/// header must be the one PostgreSQL writes at that position, as `XLogReaderValidatePageHeader`
/// checks it on replay (magic, address, timeline never newer than the stream's nor going back,
/// and on a segment's first page the long header's system identifier, segment and block size).
/// A header split across ranges is checked once its last byte arrives.
///
/// The pages that follow a WAL switch record are never written: the segment file keeps its
/// zeros there and walsender sends them as they are. So a page whose header is all zeros is
/// accepted anywhere but at a segment's start, and then the rest of that segment must be zeros
/// too.
#[derive(Clone, Debug)]
pub struct StreamedPages {
    cluster: ClusterWal,
    tli: TimelineId,
    next: Lsn,
    /// The page whose header is being collected and its bytes so far, when a range ended
    /// inside a header.
    partial: Option<(Lsn, Vec<u8>)>,
    /// Timeline of the last page checked.
    last_tli: Option<TimelineId>,
    /// The segment whose pages are zeros from some page on.
    zeroed: Option<SegmentNo>,
}

impl StreamedPages {
    /// A stream of timeline `tli` starting at `start`. Started inside a page header, that one
    /// header is not checked: its first bytes were never seen here.
    pub fn new(
        cluster: ClusterWal,
        tli: TimelineId,
        start: Lsn,
    ) -> Result<StreamedPages, WalError> {
        check_block_size(cluster.block_size)?;
        Ok(StreamedPages {
            cluster,
            tli,
            next: start,
            partial: None,
            last_tli: None,
            zeroed: None,
        })
    }

    /// Where the next range must start: the end of everything checked.
    pub fn next(&self) -> Lsn {
        self.next
    }

    /// The timeline being streamed.
    pub fn tli(&self) -> TimelineId {
        self.tli
    }

    /// Checks `data`, streamed from `start`, and returns where it ends.
    pub fn feed(&mut self, start: Lsn, data: &[u8]) -> Result<Lsn, WalError> {
        if start != self.next {
            return Err(WalError::StreamPosition {
                found: start,
                expected: self.next,
            });
        }
        let len = data.len() as u64;
        let end = start
            .checked_add(len)
            .ok_or(WalError::LsnOverflow { start, len })?;
        let block = u64::from(self.cluster.block_size);
        let mut pos = start.0;
        while pos < end.0 {
            let page = pos - pos % block;
            let header_len = if Lsn(page).segment_offset(self.cluster.seg_size) == 0 {
                SIZE_OF_XLOG_LONG_PHD
            } else {
                SIZE_OF_XLOG_SHORT_PHD
            } as u64;
            let header_end = page + header_len;
            if pos >= header_end {
                // In the page's data: on to the next page, if the address space has one.
                match page.checked_add(block) {
                    Some(next_page) => pos = next_page,
                    None => break,
                }
                continue;
            }
            let upto = header_end.min(end.0);
            let bytes = &data[(pos - start.0) as usize..(upto - start.0) as usize];
            let collected = match self.partial.take() {
                _ if pos == page => Some(bytes.to_vec()),
                Some((at, mut head)) if at.0 == page && head.len() as u64 == pos - page => {
                    head.extend_from_slice(bytes);
                    Some(head)
                }
                _ => None,
            };
            if let Some(head) = collected {
                if upto == header_end {
                    self.check_header(Lsn(page), &head)?;
                } else {
                    self.partial = Some((Lsn(page), head));
                }
            }
            pos = upto;
        }
        self.next = end;
        Ok(end)
    }

    fn check_header(&mut self, page: Lsn, bytes: &[u8]) -> Result<(), WalError> {
        let bad = |problem: String| WalError::BadPage { lsn: page, problem };
        let segno = page.segment_number(self.cluster.seg_size);
        let first = page.segment_offset(self.cluster.seg_size) == 0;
        if !first && bytes.iter().all(|&b| b == 0) {
            self.zeroed = Some(segno);
            return Ok(());
        }
        if self.zeroed == Some(segno) {
            return Err(bad(
                "a page header after a page of zeros in the same segment \
                 (PostgreSQL leaves the rest of a segment unwritten only after a WAL switch)"
                    .into(),
            ));
        }
        let header = short_page_header(bytes).map_err(|e| bad(e.to_string()))?;
        let cluster = &self.cluster;
        if header.major != cluster.major {
            return Err(bad(format!(
                "magic 0x{:04X} is PostgreSQL {}'s, but the server is PostgreSQL {}",
                header.magic, header.major, cluster.major
            )));
        }
        if header.pageaddr != page {
            return Err(bad(format!(
                "page address {} is not the page's position",
                header.pageaddr
            )));
        }
        if header.tli > self.tli {
            return Err(bad(format!(
                "timeline {} is newer than the streamed timeline {}",
                header.tli.0, self.tli.0
            )));
        }
        if let Some(last) = self.last_tli.filter(|&last| header.tli < last) {
            return Err(bad(format!(
                "timeline {} follows a page of timeline {}",
                header.tli.0, last.0
            )));
        }
        if first {
            let long = LongPageHeader::parse(bytes).map_err(|e| bad(e.to_string()))?;
            let mismatch = [
                (
                    "system identifier",
                    long.system_identifier,
                    cluster.system_identifier,
                ),
                (
                    "segment size",
                    u64::from(long.seg_size.bytes()),
                    u64::from(cluster.seg_size.bytes()),
                ),
                (
                    "block size",
                    u64::from(long.block_size),
                    u64::from(cluster.block_size),
                ),
            ]
            .into_iter()
            .find(|(_, found, expected)| found != expected);
            if let Some((what, found, expected)) = mismatch {
                return Err(bad(format!(
                    "{what} {found} in the segment's first page is not the server's {expected}"
                )));
            }
        }
        self.last_tli = Some(header.tli);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYSID: u64 = 7_301_234_567_890_123_456;
    const MIB: u32 = 1024 * 1024;

    /// A header as PostgreSQL lays it out, built field by field so that a
    /// wrong offset in the parser shows up as a wrong value.
    struct Hdr {
        magic: u16,
        info: u16,
        tli: u32,
        pageaddr: u64,
        rem_len: u32,
        sysid: u64,
        seg_size: u32,
        blcksz: u32,
    }

    impl Hdr {
        fn new(major: PgMajor) -> Hdr {
            Hdr {
                magic: major.magic(),
                info: XLP_LONG_HEADER | XLP_BKP_REMOVABLE,
                tli: 1,
                pageaddr: 0x300_0000,
                rem_len: 0,
                sysid: SYSID,
                seg_size: 16 * MIB,
                blcksz: 8192,
            }
        }

        fn bytes(&self) -> Vec<u8> {
            let mut b = Vec::with_capacity(SIZE_OF_XLOG_LONG_PHD);
            b.extend_from_slice(&self.magic.to_le_bytes());
            b.extend_from_slice(&self.info.to_le_bytes());
            b.extend_from_slice(&self.tli.to_le_bytes());
            b.extend_from_slice(&self.pageaddr.to_le_bytes());
            b.extend_from_slice(&self.rem_len.to_le_bytes());
            // Padding that MAXALIGN puts after xlp_rem_len; junk, to prove it is ignored.
            b.extend_from_slice(&[0xAA; 4]);
            b.extend_from_slice(&self.sysid.to_le_bytes());
            b.extend_from_slice(&self.seg_size.to_le_bytes());
            b.extend_from_slice(&self.blcksz.to_le_bytes());
            assert_eq!(b.len(), SIZE_OF_XLOG_LONG_PHD);
            b
        }
    }

    fn seg_name(s: &str) -> SegmentName {
        s.parse().unwrap()
    }

    const FULL: u64 = 16 * 1024 * 1024;

    #[test]
    fn magic_table() {
        let expected = [
            (13, 0xD106),
            (14, 0xD10D),
            (15, 0xD110),
            (16, 0xD113),
            (17, 0xD116),
            (18, 0xD118),
        ];
        for (number, magic) in expected {
            let major = PgMajor::from_magic(magic).unwrap();
            assert_eq!(major.number(), number);
            assert_eq!(major.magic(), magic);
            assert_eq!(PgMajor::from_number(number), Some(major));
            assert_eq!(major.to_string(), number.to_string());
        }
        assert_eq!(PgMajor::from_magic(0xD101), None);
        assert_eq!(PgMajor::from_magic(0x06D1), None);
        assert_eq!(PgMajor::from_magic(0), None);
        assert_eq!(PgMajor::from_number(12), None);
        assert_eq!(PgMajor::from_number(19), None);
        assert_eq!(PgMajor::supported(16), Ok(PgMajor::V16));
        assert_eq!(
            (PgMajor::oldest(), PgMajor::newest()),
            (PgMajor::V13, PgMajor::V18)
        );
        assert!(PgMajor::V13 < PgMajor::V18);
    }

    #[test]
    fn parses_long_header_for_every_major() {
        for major in PgMajor::ALL {
            let mut h = Hdr::new(major);
            h.tli = 3;
            h.pageaddr = 0x1_2C00_0000;
            h.rem_len = 0x1234;
            h.info = XLP_LONG_HEADER | XLP_FIRST_IS_CONTRECORD;
            h.seg_size = 64 * MIB;
            h.blcksz = 32768;
            let parsed = LongPageHeader::parse(&h.bytes()).unwrap();
            assert_eq!(
                parsed,
                LongPageHeader {
                    std: ShortPageHeader {
                        magic: major.magic(),
                        major,
                        info: XLP_LONG_HEADER | XLP_FIRST_IS_CONTRECORD,
                        tli: TimelineId(3),
                        pageaddr: Lsn(0x1_2C00_0000),
                        rem_len: 0x1234,
                    },
                    system_identifier: SYSID,
                    seg_size: WalSegmentSize::new(64 << 20).unwrap(),
                    block_size: 32768,
                }
            );
        }
    }

    #[test]
    fn parse_ignores_bytes_after_the_header() {
        let mut page = Hdr::new(PgMajor::V16).bytes();
        page.resize(8192, 0x55);
        assert_eq!(
            LongPageHeader::parse(&page).unwrap().system_identifier,
            SYSID
        );
    }

    #[test]
    fn rejects_short_input() {
        let b = Hdr::new(PgMajor::V16).bytes();
        assert_eq!(
            LongPageHeader::parse(&b[..39]),
            Err(WalError::PageTooShort { len: 39, need: 40 })
        );
        assert_eq!(
            LongPageHeader::parse(&[]),
            Err(WalError::PageTooShort { len: 0, need: 40 })
        );
        assert_eq!(
            short_page_header(&b[..23]),
            Err(WalError::PageTooShort { len: 23, need: 24 })
        );
        assert!(short_page_header(&b[..24]).is_ok());
    }

    #[test]
    fn rejects_unknown_magic_and_prints_it_in_hex() {
        let mut h = Hdr::new(PgMajor::V16);
        h.magic = 0xD101;
        assert_eq!(
            LongPageHeader::parse(&h.bytes()),
            Err(WalError::UnknownMagic(0xD101))
        );
        assert!(WalError::UnknownMagic(0xD101)
            .to_string()
            .contains("0xD101"));
        // A big-endian server's bytes, read as little-endian.
        h.magic = PgMajor::V16.magic().swap_bytes();
        assert_eq!(
            LongPageHeader::parse(&h.bytes()),
            Err(WalError::UnknownMagic(0x13D1))
        );
        // An all-zero page (a preallocated, never-written segment).
        assert_eq!(
            LongPageHeader::parse(&[0; 40]),
            Err(WalError::UnknownMagic(0))
        );
    }

    /// WAL of a major newer than walvault knows (a future PostgreSQL 19 raises the magic again)
    /// is refused, and the message says that it is newer and which majors are supported.
    #[test]
    fn refuses_wal_of_a_newer_major_naming_the_supported_range() {
        let mut h = Hdr::new(PgMajor::V18);
        h.magic = PgMajor::V18.magic() + 2;
        let err = LongPageHeader::parse(&h.bytes()).unwrap_err();
        assert_eq!(err, WalError::UnknownMagic(0xD11A));
        let text = err.to_string();
        assert!(text.contains("newer than PostgreSQL 18"), "{text}");
        assert!(text.contains("13 to 18"), "{text}");
        let old = WalError::UnknownMagic(0xD101).to_string();
        assert!(!old.contains("newer"), "{old}");
    }

    #[test]
    fn refuses_an_unknown_major_number_naming_the_supported_range() {
        let future = PgMajor::supported(19).unwrap_err();
        assert_eq!(future, WalError::UnsupportedMajor(19));
        let text = future.to_string();
        assert!(text.starts_with("PostgreSQL 19 is not supported"), "{text}");
        assert!(text.contains("13 to 18"), "{text}");
        assert!(text.contains("rather than guess"), "{text}");
        let old = PgMajor::supported(12).unwrap_err().to_string();
        assert!(old.contains("PostgreSQL 12 is not supported"), "{old}");
        assert!(!old.contains("guess"), "{old}");
    }

    #[test]
    fn rejects_missing_long_flag() {
        let mut h = Hdr::new(PgMajor::V15);
        h.info = XLP_BKP_REMOVABLE;
        assert_eq!(
            LongPageHeader::parse(&h.bytes()),
            Err(WalError::NotLongHeader(XLP_BKP_REMOVABLE))
        );
    }

    #[test]
    fn rejects_invalid_info_bits() {
        let mut h = Hdr::new(PgMajor::V17);
        h.info = XLP_LONG_HEADER | 0x0010;
        assert_eq!(
            LongPageHeader::parse(&h.bytes()),
            Err(WalError::BadPageInfo(0x0012))
        );
        h.info = XLP_ALL_FLAGS;
        assert!(LongPageHeader::parse(&h.bytes()).is_ok());
    }

    #[test]
    fn rejects_bad_segment_size() {
        for bad in [0, 3 * MIB, 512 * 1024, 2048 * MIB, 16 * MIB + 1] {
            let mut h = Hdr::new(PgMajor::V16);
            h.seg_size = bad;
            assert_eq!(
                LongPageHeader::parse(&h.bytes()),
                Err(WalError::BadSegmentSize(u64::from(bad)))
            );
        }
    }

    #[test]
    fn block_size_rule() {
        for good in [1024, 2048, 4096, 8192, 16384, 32768, 65536] {
            let mut h = Hdr::new(PgMajor::V16);
            h.blcksz = good;
            assert_eq!(LongPageHeader::parse(&h.bytes()).unwrap().block_size, good);
        }
        for bad in [0, 512, 1000, 8191, 131072] {
            let mut h = Hdr::new(PgMajor::V16);
            h.blcksz = bad;
            assert_eq!(
                LongPageHeader::parse(&h.bytes()),
                Err(WalError::BadBlockSize(bad))
            );
        }
    }

    #[test]
    fn short_header_of_a_middle_page() {
        let mut h = Hdr::new(PgMajor::V14);
        h.info = XLP_FIRST_IS_CONTRECORD | XLP_BKP_REMOVABLE;
        h.pageaddr = 0x300_2000;
        h.rem_len = 2306;
        h.tli = 2;
        let b = h.bytes();
        let s = short_page_header(&b[..24]).unwrap();
        assert_eq!(
            s,
            ShortPageHeader {
                magic: 0xD10D,
                major: PgMajor::V14,
                info: 0x0005,
                tli: TimelineId(2),
                pageaddr: Lsn(0x300_2000),
                rem_len: 2306,
            }
        );
        assert!(s.first_is_contrecord());
        assert!(!s.is_long());
        assert_eq!(s.header_size(), SIZE_OF_XLOG_SHORT_PHD);
        let long = short_page_header(&Hdr::new(PgMajor::V14).bytes()).unwrap();
        assert!(long.is_long());
        assert!(!long.first_is_contrecord());
        assert_eq!(long.header_size(), SIZE_OF_XLOG_LONG_PHD);
    }

    #[test]
    fn validates_a_good_segment() {
        let name = seg_name("000000010000000000000003");
        let header = validate_segment(&name, &Hdr::new(PgMajor::V16).bytes(), FULL).unwrap();
        assert_eq!(header.std.major, PgMajor::V16);
        assert_eq!(header.system_identifier, SYSID);
    }

    #[test]
    fn validates_with_the_headers_segment_size() {
        // 1 GiB segments: 000000010000000100000003 starts at 1/C0000000.
        let mut h = Hdr::new(PgMajor::V17);
        h.seg_size = 1024 * MIB;
        h.pageaddr = 0x1_C000_0000;
        let name = seg_name("000000010000000100000003");
        assert!(validate_segment(&name, &h.bytes(), 1 << 30).is_ok());
        // The length must match the header's segment size, not the default.
        let err = validate_segment(&name, &h.bytes(), FULL).unwrap_err();
        assert!(
            matches!(err, WalError::SegmentFileSize { found: FULL, .. }),
            "{err}"
        );
        // A seg field that cannot exist with 1 GiB segments.
        let name = seg_name("000000010000000100000004");
        let err = validate_segment(&name, &h.bytes(), 1 << 30).unwrap_err();
        assert!(
            matches!(&err, WalError::InFile { problem, .. } if matches!(**problem, WalError::SegmentOutOfRange { .. }))
        );
        assert!(
            err.to_string().starts_with("000000010000000100000004: "),
            "{err}"
        );
    }

    #[test]
    fn rejects_wrong_length() {
        let name = seg_name("000000010000000000000003");
        let b = Hdr::new(PgMajor::V16).bytes();
        for len in [0, 40, FULL - 1, FULL + 1, 2 * FULL] {
            let err = validate_segment(&name, &b, len).unwrap_err();
            assert_eq!(
                err,
                WalError::SegmentFileSize {
                    file: "000000010000000000000003".into(),
                    found: len,
                    expected: WalSegmentSize::DEFAULT
                }
            );
        }
        let msg = validate_segment(&name, &b, 8192).unwrap_err().to_string();
        assert!(
            msg.starts_with("000000010000000000000003: file is 8192 bytes"),
            "{msg}"
        );
        assert!(msg.contains("16777216"), "{msg}");
    }

    #[test]
    fn rejects_page_address_mismatch() {
        let name = seg_name("000000010000000000000003");
        let mut h = Hdr::new(PgMajor::V16);
        h.pageaddr = 0x200_0000;
        let err = validate_segment(&name, &h.bytes(), FULL).unwrap_err();
        assert_eq!(
            err.to_string(),
            "000000010000000000000003: page address 0/2000000 does not match the segment's start 0/3000000"
        );
        // A recycled segment keeps its old header until rewritten.
        h.pageaddr = 0x400_0000;
        assert!(matches!(
            validate_segment(&name, &h.bytes(), FULL),
            Err(WalError::PageAddressMismatch {
                found: Lsn(0x400_0000),
                expected: Lsn(0x300_0000),
                ..
            })
        ));
        // Off by a page, not a segment.
        h.pageaddr = 0x300_2000;
        assert!(validate_segment(&name, &h.bytes(), FULL).is_err());
    }

    #[test]
    fn timeline_rule() {
        let mut h = Hdr::new(PgMajor::V16);
        // Same timeline, and a parent's page in the child's first segment.
        for (page_tli, name_text) in [
            (2, "000000020000000000000003"),
            (1, "000000020000000000000003"),
        ] {
            h.tli = page_tli;
            assert!(
                validate_segment(&seg_name(name_text), &h.bytes(), FULL).is_ok(),
                "{page_tli} {name_text}"
            );
        }
        h.tli = 3;
        let err =
            validate_segment(&seg_name("000000020000000000000003"), &h.bytes(), FULL).unwrap_err();
        assert_eq!(
            err,
            WalError::TimelineFromFuture {
                file: "000000020000000000000003".into(),
                found: TimelineId(3),
                name_tli: TimelineId(2)
            }
        );
        assert!(
            err.to_string().contains("00000003") && err.to_string().contains("00000002"),
            "{err}"
        );
    }

    #[test]
    fn header_errors_name_the_file() {
        let mut h = Hdr::new(PgMajor::V16);
        h.magic = 0xBEEF;
        let err =
            validate_segment(&seg_name("000000010000000000000003"), &h.bytes(), FULL).unwrap_err();
        assert_eq!(
            err,
            WalError::InFile {
                file: "000000010000000000000003".into(),
                problem: Box::new(WalError::UnknownMagic(0xBEEF))
            }
        );
        assert!(
            err.to_string()
                .starts_with("000000010000000000000003: unknown WAL page magic 0xBEEF"),
            "{err}"
        );
        let err =
            validate_partial(&seg_name("000000010000000000000003"), &h.bytes(), FULL).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("000000010000000000000003.partial: "),
            "{err}"
        );
    }

    #[test]
    fn partial_length_bounds() {
        let name = seg_name("000000010000000000000003");
        let b = Hdr::new(PgMajor::V16).bytes();
        for ok in [40, 8192, 100_000, FULL] {
            assert!(validate_partial(&name, &b, ok).is_ok(), "{ok}");
        }
        for bad in [0, 39, FULL + 1] {
            assert_eq!(
                validate_partial(&name, &b, bad),
                Err(WalError::PartialFileSize {
                    file: "000000010000000000000003.partial".into(),
                    found: bad,
                    seg_size: WalSegmentSize::DEFAULT
                })
            );
        }
        // The other checks still apply to partials.
        let mut h = Hdr::new(PgMajor::V16);
        h.pageaddr = 0;
        assert!(matches!(
            validate_partial(&name, &h.bytes(), FULL),
            Err(WalError::PageAddressMismatch { .. })
        ));
        h = Hdr::new(PgMajor::V16);
        h.tli = 2;
        assert!(matches!(
            validate_partial(&name, &h.bytes(), FULL),
            Err(WalError::TimelineFromFuture { .. })
        ));
    }

    const BLOCK: u64 = 8192;

    fn cluster() -> ClusterWal {
        ClusterWal {
            major: PgMajor::V15,
            system_identifier: SYSID,
            seg_size: WalSegmentSize::new(u64::from(MIB)).unwrap(),
            block_size: BLOCK as u32,
        }
    }

    /// `pages` WAL pages from `start` (a page boundary) as PostgreSQL 15 writes them on
    /// timeline 1 with 1 MiB segments: a long header on each segment's first page.
    fn stream_bytes(start: u64, pages: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for n in 0..pages {
            let at = start + n * BLOCK;
            let mut h = Hdr::new(PgMajor::V15);
            h.pageaddr = at;
            h.seg_size = MIB;
            let mut page = if at.is_multiple_of(u64::from(MIB)) {
                h.bytes()
            } else {
                h.info = XLP_BKP_REMOVABLE;
                h.bytes()[..SIZE_OF_XLOG_SHORT_PHD].to_vec()
            };
            page.resize(BLOCK as usize, (n % 251) as u8);
            out.extend_from_slice(&page);
        }
        out
    }

    /// Feeds `bytes` from `start` in pieces of the given sizes (cycled), as messages.
    fn feed_in(
        pages: &mut StreamedPages,
        start: u64,
        bytes: &[u8],
        sizes: &[usize],
    ) -> Result<(), WalError> {
        let mut at = 0;
        for size in sizes.iter().cycle() {
            if at == bytes.len() {
                return Ok(());
            }
            let to = (at + size).min(bytes.len());
            let end = pages.feed(Lsn(start + at as u64), &bytes[at..to])?;
            assert_eq!(end, Lsn(start + to as u64));
            at = to;
        }
        unreachable!()
    }

    const SEG_START: u64 = 0x30_0000;

    #[test]
    fn streamed_pages_pass_whatever_the_message_boundaries() {
        let bytes = stream_bytes(SEG_START - 2 * BLOCK, 6);
        for sizes in [
            &[bytes.len()][..],
            &[1],
            &[7, 30, 8192],
            &[8190, 5, 50],
            &[16, 16, 8],
        ] {
            let mut pages =
                StreamedPages::new(cluster(), TimelineId(1), Lsn(SEG_START - 2 * BLOCK)).unwrap();
            feed_in(&mut pages, SEG_START - 2 * BLOCK, &bytes, sizes).unwrap();
            assert_eq!(pages.next(), Lsn(SEG_START + 4 * BLOCK));
        }
        // Resumed inside a header: that header's start was checked by whoever saw it.
        let mut pages = StreamedPages::new(cluster(), TimelineId(1), Lsn(SEG_START + 10)).unwrap();
        pages
            .feed(Lsn(SEG_START + 10), &bytes[2 * BLOCK as usize + 10..])
            .unwrap();
    }

    /// Which error a stream gets with one header field changed on the page at `page`.
    fn corrupted(page: u64, change: impl Fn(&mut Hdr)) -> WalError {
        let start = SEG_START - BLOCK;
        let mut bytes = stream_bytes(start, 3);
        let mut h = Hdr::new(PgMajor::V15);
        h.pageaddr = page;
        h.seg_size = MIB;
        let long = page.is_multiple_of(u64::from(MIB));
        if !long {
            h.info = XLP_BKP_REMOVABLE;
        }
        change(&mut h);
        let header = h.bytes();
        let len = if long {
            SIZE_OF_XLOG_LONG_PHD
        } else {
            SIZE_OF_XLOG_SHORT_PHD
        };
        let at = (page - start) as usize;
        bytes[at..at + len].copy_from_slice(&header[..len]);
        // Split inside the header: the check must not depend on the message boundaries.
        let mut pages = StreamedPages::new(cluster(), TimelineId(2), Lsn(start)).unwrap();
        let err = feed_in(&mut pages, start, &bytes, &[at + 13, 100_000]).unwrap_err();
        match &err {
            WalError::BadPage { lsn, .. } => assert_eq!(*lsn, Lsn(page), "{err}"),
            other => panic!("{other}"),
        }
        err
    }

    #[test]
    fn streamed_pages_refuse_headers_that_do_not_fit() {
        let middle = SEG_START + BLOCK;
        type Change = Box<dyn Fn(&mut Hdr)>;
        let cases: Vec<(u64, Change, &str)> = vec![
            (
                middle,
                Box::new(|h| h.pageaddr += BLOCK),
                "page address 0/304000",
            ),
            (
                SEG_START,
                Box::new(|h| h.pageaddr = 0x20_0000),
                "page address 0/200000",
            ),
            (
                middle,
                Box::new(|h| h.magic = PgMajor::V16.magic()),
                "PostgreSQL 16's",
            ),
            (middle, Box::new(|h| h.magic = 0xBEEF), "0xBEEF"),
            (middle, Box::new(|h| h.tli = 3), "timeline 3 is newer"),
            (SEG_START, Box::new(|h| h.sysid += 1), "system identifier"),
            (
                SEG_START,
                Box::new(|h| h.seg_size = 2 * MIB),
                "segment size 2097152",
            ),
            (
                SEG_START,
                Box::new(|h| h.blcksz = 16384),
                "block size 16384",
            ),
            (
                SEG_START,
                Box::new(|h| h.info = XLP_BKP_REMOVABLE),
                "no long header",
            ),
        ];
        for (page, change, expected) in cases {
            let err = corrupted(page, change).to_string();
            assert!(err.contains(expected), "{expected:?} not in {err}");
        }
        // Timelines never go back within a stream: a page of timeline 2, then one of 1.
        let mut bytes = stream_bytes(SEG_START, 2);
        bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
        let mut pages = StreamedPages::new(cluster(), TimelineId(2), Lsn(SEG_START)).unwrap();
        let err = pages.feed(Lsn(SEG_START), &bytes).unwrap_err();
        assert_eq!(
            err.to_string(),
            "WAL page at 0/302000: timeline 1 follows a page of timeline 2"
        );
    }

    #[test]
    fn zero_pages_end_a_segment() {
        // A WAL switch in the first page: the rest of the segment is zeros, the next one WAL.
        let mut bytes = stream_bytes(SEG_START, 1);
        bytes.resize(MIB as usize, 0);
        bytes.extend_from_slice(&stream_bytes(SEG_START + u64::from(MIB), 2));
        let mut pages = StreamedPages::new(cluster(), TimelineId(1), Lsn(SEG_START)).unwrap();
        feed_in(&mut pages, SEG_START, &bytes, &[8000, 70_000]).unwrap();
        // A page after zeros in the same segment is not what PostgreSQL writes.
        let mut bytes = stream_bytes(SEG_START, 3);
        bytes[BLOCK as usize..2 * BLOCK as usize].fill(0);
        let mut pages = StreamedPages::new(cluster(), TimelineId(1), Lsn(SEG_START)).unwrap();
        let err = pages.feed(Lsn(SEG_START), &bytes).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("WAL page at 0/304000: a page header after a page of zeros"),
            "{err}"
        );
        // A segment never starts with zeros.
        let mut pages = StreamedPages::new(cluster(), TimelineId(1), Lsn(SEG_START)).unwrap();
        let err = pages.feed(Lsn(SEG_START), &[0; 100]).unwrap_err();
        assert!(err.to_string().contains("magic 0x0000"), "{err}");
    }

    #[test]
    fn streamed_ranges_must_be_consecutive() {
        let bytes = stream_bytes(SEG_START, 2);
        let mut pages = StreamedPages::new(cluster(), TimelineId(1), Lsn(SEG_START)).unwrap();
        pages.feed(Lsn(SEG_START), &bytes[..100]).unwrap();
        let back = pages
            .feed(Lsn(SEG_START + 50), &bytes[50..200])
            .unwrap_err();
        assert_eq!(
            back.to_string(),
            "WAL from 0/300032 does not continue the stream at 0/300064 (it goes backwards)"
        );
        let gap = pages
            .feed(Lsn(SEG_START + 200), &bytes[200..300])
            .unwrap_err();
        assert!(gap.to_string().ends_with("(it leaves a gap)"), "{gap}");
        assert_eq!(pages.next(), Lsn(SEG_START + 100));
        // Nothing wraps around the end of the address space.
        let top = Lsn(u64::MAX - 10);
        let mut pages = StreamedPages::new(cluster(), TimelineId(1), top).unwrap();
        assert_eq!(
            pages.feed(top, &[0; 20]),
            Err(WalError::LsnOverflow {
                start: top,
                len: 20
            })
        );
        assert_eq!(
            StreamedPages::new(
                ClusterWal {
                    block_size: 0,
                    ..cluster()
                },
                TimelineId(1),
                top
            )
            .unwrap_err(),
            WalError::BadBlockSize(0)
        );
    }
}

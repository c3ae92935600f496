//! A layer's tar stream, header by header, with every record judged by its
//! header before it is read.
//!
//! The `tar` crate reads extension records (PAX headers, GNU long names and
//! links) whole before it hands out the entry they describe, so a 1 GiB PAX
//! path is in memory before anything can refuse it, and it expands GNU sparse
//! holes into zeros. The framing here is ours: an extension record is refused
//! from the size its header declares when that is over the limit, a sparse
//! entry comes with its map (segments and declared size) before any data is
//! read, and entry data is a reader bounded by the entry's size. The `tar`
//! crate's typed header views still parse the fields.
//!
//! What is accepted matches what the `tar` crate accepted: ustar, GNU and old
//! headers, GNU `L`/`K` long names, PAX `x` records (with `size`, `path` and
//! `linkpath` overriding the header) and `g` records (skipped), and old GNU
//! sparse entries (`S`, with extension blocks); the first all-zero block ends
//! the archive.

use std::io::{self, Read};

use tar::{EntryType, GnuExtSparseHeader, GnuSparseHeader, Header};

use super::layer::LayerError;

const BLOCK: u64 = 512;

/// One archive member, its extension records already applied.
pub(crate) struct TarEntry {
    pub header: Header,
    /// The name: GNU long name, else PAX `path`, else the header's.
    pub path: Vec<u8>,
    /// The link target: GNU long link, else PAX `linkpath`, else the header's.
    pub link: Option<Vec<u8>>,
    /// The PAX records describing this member, as `(key, value)`.
    pub pax: Vec<(Vec<u8>, Vec<u8>)>,
    /// Bytes of data the member has in the archive.
    pub size: u64,
    /// For a GNU sparse member: where its data goes and its declared size.
    pub sparse: Option<SparseMap>,
}

/// A GNU sparse file: `(offset, length)` of each data segment, in order and
/// not overlapping, and the file's size (holes included).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct SparseMap {
    pub segments: Vec<(u64, u64)>,
    pub real_size: u64,
}

pub(crate) struct TarStream<R> {
    inner: R,
    /// Bytes consumed from `inner`, for messages.
    pos: u64,
    /// Data of the current member not read yet, then its padding.
    remaining: u64,
    padding: u64,
    max_record: u64,
}

impl<R: Read> TarStream<R> {
    /// `max_record`: the largest extension record (PAX, long name, sparse
    /// map) read into memory.
    pub fn new(inner: R, max_record: u64) -> Self {
        TarStream { inner, pos: 0, remaining: 0, padding: 0, max_record }
    }

    /// The next member, skipping what is left of the previous one; `None` at
    /// the end of the archive.
    pub fn next_entry(&mut self) -> Result<Option<TarEntry>, LayerError> {
        self.skip(self.remaining + self.padding)?;
        self.remaining = 0;
        self.padding = 0;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Option<Vec<u8>> = None;
        loop {
            let offset = self.pos;
            let mut header = Header::new_old();
            let pending = long_name.is_some() || long_link.is_some() || pax.is_some();
            if !self.read_block(header.as_mut_bytes())? || header.as_bytes().iter().all(|&b| b == 0) {
                if pending {
                    return Err(malformed(offset, "extension headers describe a member the archive does not hold"));
                }
                return Ok(None);
            }
            check_checksum(&header, offset)?;
            let size = header.entry_size().map_err(bad_field(offset, "size"))?;
            let kind = header.entry_type();
            let slot = match kind {
                EntryType::GNULongName => Some((&mut long_name, "a GNU long name record")),
                EntryType::GNULongLink => Some((&mut long_link, "a GNU long link record")),
                EntryType::XHeader => Some((&mut pax, "a PAX extended header")),
                _ => None,
            };
            if let Some((slot, what)) = slot {
                if slot.is_some() {
                    return Err(malformed(offset, format!("two of {what} describe the same member")));
                }
                *slot = Some(self.read_record(size, what, offset)?);
                continue;
            }
            if kind == EntryType::XGlobalHeader {
                // Defaults for the rest of the archive; nothing we use.
                self.check_record(size, "a PAX global header", offset)?;
                self.skip(size + padding(size))?;
                continue;
            }
            let pax = match pax {
                Some(raw) => parse_pax(&raw).map_err(|e| malformed(offset, e))?,
                None => Vec::new(),
            };
            let pax_value = |key: &[u8]| pax.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_slice());
            let mut size = size;
            if let Some(v) = pax_value(b"size") {
                size = std::str::from_utf8(v)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| malformed(offset, format!("PAX size {:?} is not a number", super::path::excerpt(v))))?;
            }
            let sparse = if kind == EntryType::GNUSparse { Some(self.read_sparse_map(&header, size, offset)?) } else { None };
            let path = match long_name {
                Some(name) => strip_nul(name),
                None => pax_value(b"path").map(<[u8]>::to_vec).unwrap_or_else(|| header.path_bytes().into_owned()),
            };
            let link = match long_link {
                Some(link) => Some(strip_nul(link)),
                None => pax_value(b"linkpath").map(<[u8]>::to_vec).or_else(|| header.link_name_bytes().map(|l| l.into_owned())),
            };
            self.remaining = size;
            self.padding = padding(size);
            return Ok(Some(TarEntry { header, path, link, pax, size, sparse }));
        }
    }

    /// Reads the whole of a record after checking its declared size.
    fn read_record(&mut self, size: u64, what: &'static str, offset: u64) -> Result<Vec<u8>, LayerError> {
        self.check_record(size, what, offset)?;
        let mut bytes = Vec::with_capacity(size as usize);
        (&mut self.inner).take(size).read_to_end(&mut bytes).map_err(LayerError::Read)?;
        self.pos += bytes.len() as u64;
        if bytes.len() as u64 != size {
            return Err(malformed(offset, format!("the archive ends inside {what}")));
        }
        self.skip(padding(size))?;
        Ok(bytes)
    }

    fn check_record(&self, size: u64, what: &'static str, offset: u64) -> Result<(), LayerError> {
        if size > self.max_record {
            return Err(LayerError::HeaderTooLarge { what, offset, size, limit: self.max_record });
        }
        Ok(())
    }

    /// Reads an old GNU sparse member's map: four segments in the header, 21
    /// more in each extension block that follows.
    fn read_sparse_map(&mut self, header: &Header, stored: u64, offset: u64) -> Result<SparseMap, LayerError> {
        let gnu = header.as_gnu().ok_or_else(|| malformed(offset, "a sparse member without a GNU header"))?;
        let real_size = gnu.real_size().map_err(bad_field(offset, "sparse real size"))?;
        let mut map = SparseMap { segments: Vec::new(), real_size };
        let mut data = 0u64;
        let mut add = |map: &mut SparseMap, block: &GnuSparseHeader| -> Result<(), LayerError> {
            if block.is_empty() {
                return Ok(());
            }
            let start = block.offset().map_err(bad_field(offset, "sparse offset"))?;
            let len = block.length().map_err(bad_field(offset, "sparse length"))?;
            let end_of_last = map.segments.last().map_or(0, |&(o, l)| o + l);
            let end = start.checked_add(len).filter(|&end| start >= end_of_last && end <= real_size);
            if end.is_none() {
                return Err(malformed(offset, "sparse segments out of order, overlapping or past the file's size"));
            }
            data += len;
            if len > 0 {
                map.segments.push((start, len));
            }
            Ok(())
        };
        for block in &gnu.sparse {
            add(&mut map, block)?;
        }
        let mut extended = gnu.is_extended();
        let mut map_bytes = BLOCK;
        while extended {
            map_bytes += BLOCK;
            self.check_record(map_bytes, "a GNU sparse map", offset)?;
            let mut ext = GnuExtSparseHeader::new();
            if !self.read_block(ext.as_mut_bytes())? {
                return Err(malformed(offset, "the archive ends inside a GNU sparse map"));
            }
            for block in &ext.sparse {
                add(&mut map, block)?;
            }
            extended = ext.is_extended();
        }
        if data != stored {
            return Err(malformed(offset, format!("the sparse map lists {data} bytes of data, the header {stored}")));
        }
        Ok(map)
    }

    /// Fills `buf` (one block); `false` when the stream ends before it.
    fn read_block(&mut self, buf: &mut [u8; BLOCK as usize]) -> Result<bool, LayerError> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LayerError::Read(e)),
            }
        }
        self.pos += filled as u64;
        match filled {
            0 => Ok(false),
            n if n == buf.len() => Ok(true),
            _ => Err(malformed(self.pos - filled as u64, "the archive ends inside a header")),
        }
    }

    fn skip(&mut self, n: u64) -> Result<(), LayerError> {
        let skipped = io::copy(&mut (&mut self.inner).take(n), &mut io::sink()).map_err(LayerError::Read)?;
        self.pos += skipped;
        if skipped != n {
            return Err(malformed(self.pos, "the archive ends inside a member's data"));
        }
        Ok(())
    }
}

/// The current member's data, `size` bytes at most.
impl<R: Read> Read for TarStream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.inner.read(&mut buf[..want])?;
        self.remaining -= n as u64;
        self.pos += n as u64;
        Ok(n)
    }
}

/// PAX records as `(key, value)`.
type PaxRecords = Vec<(Vec<u8>, Vec<u8>)>;

/// Parses PAX records (`LEN KEY=VALUE\n`, LEN counting the whole record)
/// by their length prefix: values may hold newlines (binary xattrs).
fn parse_pax(mut data: &[u8]) -> Result<PaxRecords, &'static str> {
    let mut records = Vec::new();
    while !data.is_empty() {
        let bad = "a malformed PAX record";
        let space = data.iter().position(|&b| b == b' ').ok_or(bad)?;
        let len: usize = std::str::from_utf8(&data[..space]).ok().and_then(|l| l.parse().ok()).ok_or(bad)?;
        let record = data.get(space + 1..len).and_then(|r| r.strip_suffix(b"\n")).ok_or(bad)?;
        let eq = record.iter().position(|&b| b == b'=').ok_or(bad)?;
        records.push((record[..eq].to_vec(), record[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(records)
}

fn check_checksum(header: &Header, offset: u64) -> Result<(), LayerError> {
    let bytes = header.as_bytes();
    let sum = bytes[..148].iter().chain(&bytes[156..]).map(|&b| u32::from(b)).sum::<u32>() + 8 * u32::from(b' ');
    let stored = header.cksum().map_err(bad_field(offset, "checksum"))?;
    if sum != stored {
        return Err(malformed(offset, "header checksum mismatch"));
    }
    Ok(())
}

fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

fn strip_nul(mut name: Vec<u8>) -> Vec<u8> {
    if name.last() == Some(&0) {
        name.pop();
    }
    name
}

/// A numeric header field that does not parse, named without its bytes (the
/// tar crate's message quotes them raw, and the path, hostile bytes both).
fn bad_field(offset: u64, field: &'static str) -> impl FnOnce(std::io::Error) -> LayerError {
    move |_| malformed(offset, format!("the header's {field} field is not a number"))
}

fn malformed(offset: u64, reason: impl ToString) -> LayerError {
    LayerError::Malformed { offset, reason: reason.to_string() }
}

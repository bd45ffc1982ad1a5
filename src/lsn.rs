//! WAL positions.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// A WAL location (`XLogRecPtr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The start of the segment holding this LSN.
    pub fn segment_start(self, seg_size: u64) -> Lsn {
        Lsn(self.0 - self.0 % seg_size)
    }

    /// The WAL file name holding this LSN on `tli`.
    pub fn wal_file_name(self, tli: u32, seg_size: u64) -> String {
        let seg = self.0 / seg_size;
        let per_xlogid = 0x1_0000_0000u64 / seg_size;
        format!("{tli:08X}{:08X}{:08X}", seg / per_xlogid, seg % per_xlogid)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl FromStr for Lsn {
    type Err = Error;
    /// Parses `%X/%X`, also the zero-padded `%X/%08X` form of PostgreSQL 18.
    fn from_str(s: &str) -> Result<Lsn, Error> {
        let bad = || Error::Protocol(format!("invalid LSN \"{s}\""));
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn(((hi as u64) << 32) | lo as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_file_names() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!("0/0000ABCD".parse::<Lsn>().unwrap(), Lsn(0xabcd));
        assert!("x/1".parse::<Lsn>().is_err());
        assert_eq!(
            Lsn(0x0000_0001_0200_0028).wal_file_name(1, 16 << 20),
            "000000010000000100000002"
        );
        assert_eq!(Lsn(0x0300_0028).segment_start(16 << 20), Lsn(0x0300_0000));
    }
}

//! Calendar dates from Unix times, for the timestamps formats carry
//! (KBUILD_BUILD_TIMESTAMP, FAT directory entries, OCI `created`). Written
//! here because it is twenty lines and every use is UTC with no clock read.

/// A UTC date and time of day (proleptic Gregorian calendar).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl Civil {
    /// The date of `epoch` seconds since 1970-01-01T00:00:00Z (Howard
    /// Hinnant's civil-from-days algorithm).
    pub fn from_epoch(epoch: i64) -> Civil {
        let (days, secs) = (epoch.div_euclid(86_400), epoch.rem_euclid(86_400));
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Civil { year, month, day, hour: (secs / 3600) as u32, minute: (secs / 60 % 60) as u32, second: (secs % 60) as u32 }
    }

    /// `YYYY-MM-DDTHH:MM:SSZ`.
    pub fn rfc3339(&self) -> String {
        format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", self.year, self.month, self.day, self.hour, self.minute, self.second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(Civil::from_epoch(0).rfc3339(), "1970-01-01T00:00:00Z");
        assert_eq!(Civil::from_epoch(1_700_000_000).rfc3339(), "2023-11-14T22:13:20Z");
        assert_eq!(Civil::from_epoch(951_782_400).rfc3339(), "2000-02-29T00:00:00Z");
        assert_eq!(Civil::from_epoch(-1).rfc3339(), "1969-12-31T23:59:59Z");
        assert_eq!(Civil::from_epoch(4_354_819_199).rfc3339(), "2107-12-31T23:59:59Z");
    }
}

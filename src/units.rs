//! Durations and sizes as people write them in config files and on the command line
//! (`90s`, `1h30m`, `500MiB`): one parser each for the config, the CLI and the API, and a
//! formatter that writes what the parser reads back. Memory limits have a parser of their own,
//! [`parse_memory`], binary in every spelling as docker, Slurm and Kubernetes read them.

use std::time::Duration;

/// Why a size or a duration was not understood: what was given, and what would have been.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// Nothing was given.
    #[error("empty {what}")]
    Empty {
        /// `size` or `duration`.
        what: &'static str,
    },
    /// Not a number followed by a unit.
    #[error("{input:?} is not a {what} (expected e.g. {examples})")]
    Malformed {
        /// `size` or `duration`.
        what: &'static str,
        /// The text given.
        input: String,
        /// What such a value looks like.
        examples: &'static str,
    },
    /// A unit this kind of value does not take.
    #[error("{input:?} has unknown unit {unit:?} (use {known})")]
    UnknownUnit {
        /// The text given.
        input: String,
        /// The unit in it.
        unit: String,
        /// The units that are understood.
        known: &'static str,
    },
    /// A decimal unit where memory sizes are binary.
    #[error(
        "{input:?}: {unit} could mean powers of 1000 or of 1024; memory sizes are binary (as \
         docker, Slurm and Kubernetes read them): write {number}{letter} or {number}{letter}iB"
    )]
    Ambiguous {
        /// The text given.
        input: String,
        /// The unit in it, e.g. `MB`.
        unit: String,
        /// The number before it.
        number: u64,
        /// The unit's letter, e.g. `M`.
        letter: char,
    },
    /// A number without a unit where one is needed.
    #[error("{input:?} needs a unit (ms, s, m, h or d)")]
    NoUnit {
        /// The text given.
        input: String,
    },
    /// More than the value's type holds.
    #[error("{input:?} is too large")]
    TooLarge {
        /// The text given.
        input: String,
    },
}

/// Parses sizes such as `500MiB`, `10GiB`, `2G` (decimal), `1048576`.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| UnitError::Malformed {
        what: "size",
        input: s.to_owned(),
        examples: "500MiB, 10GiB, 2G",
    })?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1000,
        "KiB" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        "T" | "TB" => 1_000_000_000_000,
        "TiB" => 1 << 40,
        u => {
            return Err(UnitError::UnknownUnit {
                input: s.to_owned(),
                unit: u.to_owned(),
                known: "B, KiB, MiB, GiB, TiB, K, M, G, T",
            })
        }
    };
    n.checked_mul(mult).ok_or_else(|| UnitError::TooLarge {
        input: s.to_owned(),
    })
}

/// Parses a memory size as docker (`-m 32m`), Slurm (`--mem=32M`) and Kubernetes (`32Mi`)
/// users write it: every unit is binary. `k`, `m`, `g`, `t` in either case, `Ki` … `Ti` and
/// `KiB` … `TiB` (their `i` and `B` in either case too); a bare number (or `B`) is bytes.
/// `MB` and the like are refused as ambiguous: a config file's `2G` is decimal (see
/// [`parse_size`]), a memory limit's is not.
pub fn parse_memory(s: &str) -> Result<u64, UnitError> {
    const KNOWN: &str =
        "k, m, g, t in either case, Ki, Mi, Gi, Ti, KiB, MiB, GiB, TiB, or none for bytes";
    let t = s.trim();
    if t.is_empty() {
        return Err(UnitError::Empty {
            what: "memory size",
        });
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(UnitError::Malformed {
            what: "memory size",
            input: s.to_owned(),
            examples: "512m, 4G, 32Mi, 1GiB",
        });
    }
    let too_large = || UnitError::TooLarge {
        input: s.to_owned(),
    };
    let n: u64 = digits.parse().map_err(|_| too_large())?;
    let unit = unit.trim();
    let unknown = || UnitError::UnknownUnit {
        input: s.to_owned(),
        unit: unit.to_owned(),
        known: KNOWN,
    };
    let mut letters = unit.chars();
    let first = letters.next();
    let shift = match first.map(|c| c.to_ascii_lowercase()) {
        None => 0,
        Some('b') if unit.len() == 1 => 0,
        Some('k') => 10,
        Some('m') => 20,
        Some('g') => 30,
        Some('t') => 40,
        Some('.' | ',') => {
            return Err(UnitError::Malformed {
                what: "whole memory size",
                input: s.to_owned(),
                examples: "1536m rather than 1.5g",
            })
        }
        Some(_) => return Err(unknown()),
    };
    match letters.as_str().to_ascii_lowercase().as_str() {
        _ if shift == 0 => {}
        "" | "i" | "ib" => {}
        "b" => {
            return Err(UnitError::Ambiguous {
                input: s.to_owned(),
                unit: unit.to_owned(),
                number: n,
                letter: first.unwrap_or('?').to_ascii_uppercase(),
            })
        }
        _ => return Err(unknown()),
    }
    n.checked_mul(1 << shift).ok_or_else(too_large)
}

/// Parses durations such as `500ms`, `90s`, `10m`, `1h30m`, `2d`.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    const EXAMPLES: &str = "500ms, 90s, 10m, 1h30m";
    let s = s.trim();
    if s.is_empty() {
        return Err(UnitError::Empty { what: "duration" });
    }
    let too_large = || UnitError::TooLarge {
        input: s.to_owned(),
    };
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(UnitError::Malformed {
                what: "duration",
                input: s.to_owned(),
                examples: EXAMPLES,
            });
        }
        let n: u64 = rest[..digits].parse().map_err(|_| too_large())?;
        let after = &rest[digits..];
        let unit_len = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let unit = &after[..unit_len];
        rest = &after[unit_len..];
        let secs = |mult: u64| {
            n.checked_mul(mult)
                .map(Duration::from_secs)
                .ok_or_else(too_large)
        };
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => secs(60)?,
            "h" => secs(3600)?,
            "d" => secs(86400)?,
            "" => {
                return Err(UnitError::NoUnit {
                    input: s.to_owned(),
                })
            }
            other => {
                return Err(UnitError::UnknownUnit {
                    input: s.to_owned(),
                    unit: other.to_owned(),
                    known: "ms, s, m, h or d",
                })
            }
        };
        total = total.checked_add(part).ok_or_else(too_large)?;
    }
    Ok(total)
}

/// The longest time limit a step may have: a year (longer is a typo, or an overflow).
pub const MAX_TIME_LIMIT: Duration = Duration::from_secs(365 * 86400);

/// Why a step's time limit was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeLimitError {
    /// None of the forms Slurm takes.
    #[error(
        "time limit {:?} is not MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, a duration \
         such as 90s or 1h30m, or UNLIMITED",
        quote_short(.input)
    )]
    Malformed {
        /// The text given.
        input: String,
    },
    /// A duration with units that is not one.
    #[error("time limit: {0}")]
    Duration(#[from] UnitError),
    /// More seconds than fit.
    #[error("time limit {input:?} is too large")]
    TooLarge {
        /// The text given.
        input: String,
    },
    /// Zero, which must not silently mean "no limit".
    #[error("time limit {input:?} is zero; give a positive limit, or UNLIMITED for none")]
    Zero {
        /// The text given.
        input: String,
    },
    /// Longer than [`MAX_TIME_LIMIT`].
    #[error(
        "time limit {input:?} is longer than a year; give a shorter one, or UNLIMITED for none"
    )]
    OverAYear {
        /// The text given.
        input: String,
    },
}

/// Parses a step's time limit as Slurm users write it (`--time`): `MINUTES`, `MM:SS`,
/// `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`, or with units (`500ms`, `90s`, `10m`,
/// `1h30m`). `UNLIMITED` (or `INFINITE`) means no limit and gives `None`; `0` is refused
/// rather than silently meaning "no limit". At most [`MAX_TIME_LIMIT`].
pub fn parse_time_limit(s: &str) -> Result<Option<Duration>, TimeLimitError> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("unlimited") || t.eq_ignore_ascii_case("infinite") {
        return Ok(None);
    }
    let bad = || TimeLimitError::Malformed {
        input: t.to_owned(),
    };
    let d = if t.chars().any(|c| c.is_ascii_alphabetic()) {
        parse_duration(t)?
    } else {
        let num = |x: &str| -> Result<u64, TimeLimitError> {
            if x.is_empty() || !x.chars().all(|c| c.is_ascii_digit()) {
                return Err(bad());
            }
            x.parse::<u64>().map_err(|_| bad())
        };
        let (days, clock) = match t.split_once('-') {
            Some((d, rest)) => (num(d)?, Some(rest)),
            None => (0, None),
        };
        let secs: Option<u64> = match clock {
            // D-HH, D-HH:MM, D-HH:MM:SS
            Some(rest) => {
                let p: Vec<&str> = rest.split(':').collect();
                let (h, m, s) = match p.as_slice() {
                    [h] => (num(h)?, 0, 0),
                    [h, m] => (num(h)?, num(m)?, 0),
                    [h, m, s] => (num(h)?, num(m)?, num(s)?),
                    _ => return Err(bad()),
                };
                days.checked_mul(86400)
                    .and_then(|d| d.checked_add(h.checked_mul(3600)?))
                    .and_then(|d| d.checked_add(m.checked_mul(60)?))
                    .and_then(|d| d.checked_add(s))
            }
            // MINUTES, MM:SS, HH:MM:SS
            None => {
                let p: Vec<&str> = t.split(':').collect();
                match p.as_slice() {
                    [m] => num(m)?.checked_mul(60),
                    [m, s] => num(m)?
                        .checked_mul(60)
                        .and_then(|x| x.checked_add(num(s).ok()?)),
                    [h, m, s] => num(h)?
                        .checked_mul(3600)
                        .and_then(|x| x.checked_add(num(m).ok()?.checked_mul(60)?))
                        .and_then(|x| x.checked_add(num(s).ok()?)),
                    _ => return Err(bad()),
                }
            }
        };
        Duration::from_secs(secs.ok_or_else(|| TimeLimitError::TooLarge {
            input: t.to_owned(),
        })?)
    };
    if d.is_zero() {
        return Err(TimeLimitError::Zero {
            input: t.to_owned(),
        });
    }
    if d > MAX_TIME_LIMIT {
        return Err(TimeLimitError::OverAYear {
            input: t.to_owned(),
        });
    }
    Ok(Some(d))
}

/// The start of `s` that shows in at most 200 characters once escaped (as `{:?}` shows it),
/// with `…` when cut: what an error or a log line may echo of an input.
pub fn quote_short(s: &str) -> String {
    const MAX_QUOTE: usize = 200;
    let mut shown = 0;
    for (i, c) in s.char_indices() {
        shown += c.escape_debug().count();
        if shown > MAX_QUOTE {
            return format!("{}…", &s[..i]);
        }
    }
    s.to_owned()
}

/// Formats a duration the way [`parse_duration`] reads it back.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    if s != 0 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s != 0 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// Bytes in binary units, one decimal: `512 B`, `1.5 MiB`, `12.0 GiB` (every size cimage
/// prints for people goes through here).
pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A span as a clock reads it, largest unit first and every smaller one shown: `2m0s`,
/// `1h5m30s`, `45s`, `1.5s`, `250ms` (what `ImageCache.PullStallTimeout` messages say).
pub fn format_span(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, sec) = (s / 3600, (s / 60) % 60, s % 60);
    let frac = d.subsec_millis();
    if s == 0 {
        return format!("{frac}ms");
    }
    let secs = if frac == 0 {
        format!("{sec}s")
    } else {
        format!("{}s", format!("{sec}.{frac:03}").trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_like_a_clock() {
        assert_eq!(format_span(Duration::from_secs(120)), "2m0s");
        assert_eq!(format_span(Duration::from_secs(3930)), "1h5m30s");
        assert_eq!(format_span(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_span(Duration::from_millis(250)), "250ms");
        assert_eq!(format_span(Duration::from_secs(45)), "45s");
        // As `cimage pulls` shows a pull's age.
        assert_eq!(format_span(Duration::from_secs(5)), "5s");
        assert_eq!(format_span(Duration::from_secs(192)), "3m12s");
        assert_eq!(format_span(Duration::from_secs(7500)), "2h5m0s");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2_000_000_000));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("ten").is_err() && parse_size("5 parsecs").is_err());
    }

    #[test]
    fn memory_sizes_are_binary_in_every_spelling() {
        for (text, want) in [
            ("32m", 32 << 20),
            ("32M", 32 << 20),
            ("32Mi", 32 << 20),
            ("32MiB", 32 << 20),
            ("32mib", 32 << 20),
            ("4G", 4 << 30),
            ("4g", 4 << 30),
            ("4Gi", 4 << 30),
            ("512k", 512 << 10),
            ("512KiB", 512 << 10),
            ("1T", 1 << 40),
            ("1Ti", 1 << 40),
            ("1TiB", 1 << 40),
            ("33554432", 33554432),
            ("100B", 100),
            (" 8 Mi ", 8 << 20),
        ] {
            assert_eq!(parse_memory(text), Ok(want), "{text}");
        }
        for (bad, why) in [
            ("32MB", "could mean powers of 1000"),
            ("4gb", "write 4G or 4GiB"),
            ("32x", "unknown unit"),
            ("32Mx", "unknown unit"),
            ("32P", "unknown unit"),
            ("m", "is not a memory size"),
            ("1.5G", "1536m rather than 1.5g"),
            ("", "empty"),
            ("99999999999999999999", "too large"),
            ("20000000T", "too large"),
        ] {
            let e = parse_memory(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn durations() {
        for (text, want) in [
            ("500ms", Duration::from_millis(500)),
            ("90s", Duration::from_secs(90)),
            ("10m", Duration::from_secs(600)),
            ("1h30m", Duration::from_secs(5400)),
            ("2d", Duration::from_secs(172800)),
        ] {
            assert_eq!(parse_duration(text).unwrap(), want, "{text}");
            assert_eq!(parse_duration(&format_duration(want)).unwrap(), want);
        }
        for bad in ["", "10", "ten", "5 minutes", "3w", "m5"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let e = parse_duration("213503982334602d").unwrap_err().to_string();
        assert!(e.contains("too large"), "overflows u64 seconds: {e}");
        let e = parse_duration("18446744073709551615s1s")
            .unwrap_err()
            .to_string();
        assert!(e.contains("too large"), "{e}");
    }

    #[test]
    fn time_limits_in_slurm_forms() {
        let m = |n: u64| Some(Duration::from_secs(n * 60));
        for (text, want) in [
            ("90", m(90)),
            ("1:30", Some(Duration::from_secs(90))),
            ("1:30:00", m(90)),
            ("2-00", m(2 * 24 * 60)),
            ("1-12:30", m(36 * 60 + 30)),
            ("1-00:00:30", Some(Duration::from_secs(86400 + 30))),
            ("90s", Some(Duration::from_secs(90))),
            ("1h30m", m(90)),
            ("UNLIMITED", None),
            ("infinite", None),
        ] {
            assert_eq!(parse_time_limit(text), Ok(want), "{text}");
        }
        for (bad, why) in [
            ("0", "zero"),
            ("0s", "zero"),
            ("18446744073709552s", "longer than a year"),
            ("99999999999999999999", "not MINUTES"),
            ("1:2:3:4", "not MINUTES"),
            ("-5", "not MINUTES"),
            ("1-", "not MINUTES"),
            ("a:b", "time limit"),
            ("400d", "longer than a year"),
        ] {
            let e = parse_time_limit(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert_eq!(quote_short(&"x".repeat(300)).chars().count(), 201);
        // Escaped characters count as they show.
        let q = format!("{:?}", quote_short(&"\u{1a}".repeat(300)));
        assert!(q.len() < 220, "{} characters", q.len());
    }
}

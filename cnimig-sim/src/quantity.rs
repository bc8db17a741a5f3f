//! Kubernetes-style quantities for the scenario YAML: CPU (`500m`, `2`, `1.5`), memory (`512Mi`,
//! `16Gi`, bytes), budget amounts (`1`, `25%`) and durations (`30s`, `2m`).

use std::fmt;
use std::time::Duration;

use cnimig_core::model::IntOrPercent;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The largest CPU or memory figure a scenario may state (keeps all sums far from overflow).
const MAX_QUANTITY: f64 = 1e15;

/// CPU in millicores. YAML: `2` (cores), `1.5`, or `"500m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Cpu(pub u64);

/// Memory in bytes. YAML: `"512Mi"`, `"16Gi"`, `"1G"`, or a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Memory(pub u64);

impl Cpu {
    /// Whole cores.
    #[must_use]
    pub const fn cores(n: u64) -> Cpu {
        Cpu(n.saturating_mul(1000))
    }
    /// Millicores.
    #[must_use]
    pub const fn millis(n: u64) -> Cpu {
        Cpu(n)
    }
}

impl Memory {
    /// Mebibytes.
    #[must_use]
    pub const fn mib(n: u64) -> Memory {
        Memory(n.saturating_mul(1 << 20))
    }
    /// Gibibytes.
    #[must_use]
    pub const fn gib(n: u64) -> Memory {
        Memory(n.saturating_mul(1 << 30))
    }
}

/// Parses a CPU quantity: `"500m"`, `"2"`, `"1.5"`.
///
/// # Errors
/// A message saying what was expected.
pub fn parse_cpu(s: &str) -> Result<Cpu, String> {
    let t = s.trim();
    let bad =
        || format!("{s:?} is not a CPU quantity; write cores (2, 0.5) or millicores (\"500m\")");
    if let Some(m) = t.strip_suffix('m') {
        let v: f64 = m.parse().map_err(|_| bad())?;
        return finite_non_negative(v)
            .map(|v| Cpu(v.round() as u64))
            .ok_or_else(bad);
    }
    let v: f64 = t.parse().map_err(|_| bad())?;
    finite_non_negative(v * 1000.0)
        .map(|v| Cpu(v.round() as u64))
        .ok_or_else(bad)
}

/// Parses a memory quantity: `"512Mi"`, `"16Gi"`, `"1G"`, `"1000"`.
///
/// # Errors
/// A message saying what was expected.
pub fn parse_memory(s: &str) -> Result<Memory, String> {
    let t = s.trim();
    let bad = || {
        format!(
            "{s:?} is not a memory quantity; write bytes or a number with Ki, Mi, Gi, Ti, k, M, G or T (\"512Mi\")"
        )
    };
    const UNITS: [(&str, f64); 8] = [
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    let (num, mult) = UNITS
        .iter()
        .find_map(|(u, m)| t.strip_suffix(u).map(|n| (n, *m)))
        .unwrap_or((t, 1.0));
    let v: f64 = num.parse().map_err(|_| bad())?;
    finite_non_negative(v * mult)
        .map(|v| Memory(v.round() as u64))
        .ok_or_else(bad)
}

fn finite_non_negative(v: f64) -> Option<f64> {
    (v.is_finite() && (0.0..=MAX_QUANTITY).contains(&v)).then_some(v)
}

impl fmt::Display for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1000) {
            write!(f, "{}", self.0 / 1000)
        } else {
            write!(f, "{}m", self.0)
        }
    }
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in [
            ("Ti", 1u64 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
        ] {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// A scalar from YAML: a number or a string.
enum Scalar {
    Num(f64),
    Str(String),
}

struct ScalarVisitor(&'static str);

impl Visitor<'_> for ScalarVisitor {
    type Value = Scalar;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
        Ok(Scalar::Num(v as f64))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
        Ok(Scalar::Num(v as f64))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
        Ok(Scalar::Num(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
        Ok(Scalar::Str(v.to_string()))
    }
}

fn scalar<'de, D: Deserializer<'de>>(d: D, what: &'static str) -> Result<Scalar, D::Error> {
    d.deserialize_any(ScalarVisitor(what))
}

impl<'de> Deserialize<'de> for Cpu {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match scalar(d, "a CPU quantity such as 2, 0.5 or \"500m\"")? {
            Scalar::Num(v) => finite_non_negative(v * 1000.0)
                .map(|v| Cpu(v.round() as u64))
                .ok_or_else(|| {
                    de::Error::custom(format!(
                        "{v} is not a CPU quantity; use a non-negative number of cores"
                    ))
                }),
            Scalar::Str(s) => parse_cpu(&s).map_err(de::Error::custom),
        }
    }
}

impl Serialize for Cpu {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_multiple_of(1000) {
            s.serialize_u64(self.0 / 1000)
        } else {
            s.serialize_str(&self.to_string())
        }
    }
}

impl<'de> Deserialize<'de> for Memory {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match scalar(d, "a memory quantity such as \"512Mi\" or \"16Gi\"")? {
            Scalar::Num(v) => finite_non_negative(v)
                .map(|v| Memory(v.round() as u64))
                .ok_or_else(|| de::Error::custom(format!("{v} is not a memory quantity; use a non-negative number of bytes or \"512Mi\""))),
            Scalar::Str(s) => parse_memory(&s).map_err(de::Error::custom),
        }
    }
}

impl Serialize for Memory {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A PodDisruptionBudget amount: `1` or `"25%"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amount(pub IntOrPercent);

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bad = |what: &str| {
            de::Error::custom(format!(
                "{what} is not a budget amount; use a whole number of pods (1) or a percentage (\"25%\")"
            ))
        };
        match scalar(d, "a whole number of pods or a percentage such as \"25%\"")? {
            Scalar::Num(v) => {
                if v.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&v) {
                    Ok(Amount(IntOrPercent::Int(v as u32)))
                } else {
                    Err(bad(&v.to_string()))
                }
            }
            Scalar::Str(s) => {
                let t = s.trim();
                if let Some(p) = t.strip_suffix('%') {
                    p.trim()
                        .parse::<u32>()
                        .map(|p| Amount(IntOrPercent::Percent(p)))
                        .map_err(|_| bad(&format!("{s:?}")))
                } else {
                    t.parse::<u32>()
                        .map(|n| Amount(IntOrPercent::Int(n)))
                        .map_err(|_| bad(&format!("{s:?}")))
                }
            }
        }
    }
}

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            IntOrPercent::Int(n) => s.serialize_u32(n),
            IntOrPercent::Percent(p) => s.serialize_str(&format!("{p}%")),
        }
    }
}

/// A duration in the scenario YAML: `"30s"`, `"2m"`, `"500ms"` or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match scalar(d, "a duration such as \"30s\", \"2m\" or \"500ms\"")? {
            Scalar::Num(v) => {
                if v.is_finite() && (0.0..=1e9).contains(&v) {
                    Ok(Dur(Duration::from_millis((v * 1000.0).round() as u64)))
                } else {
                    Err(de::Error::custom(format!(
                        "{v} is not a duration; use seconds or \"30s\""
                    )))
                }
            }
            Scalar::Str(s) => cnimig_core::config::parse_duration(&s)
                .map(Dur)
                .map_err(|e| {
                    de::Error::custom(format!("{e}; write a duration such as \"30s\" or \"2m\""))
                }),
        }
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let ms = u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX);
        if ms % 1000 == 0 {
            s.serialize_str(&format!("{}s", ms / 1000))
        } else {
            s.serialize_str(&format!("{ms}ms"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_memory() {
        assert_eq!(parse_cpu("500m").unwrap(), Cpu(500));
        assert_eq!(parse_cpu("2").unwrap(), Cpu(2000));
        assert_eq!(parse_cpu("0.25").unwrap(), Cpu(250));
        assert!(parse_cpu("-1").is_err());
        assert!(parse_cpu("NaN").is_err());
        assert!(parse_cpu("1e300").is_err());
        assert_eq!(parse_memory("512Mi").unwrap(), Memory::mib(512));
        assert_eq!(parse_memory("1G").unwrap(), Memory(1_000_000_000));
        assert_eq!(parse_memory("100").unwrap(), Memory(100));
        assert!(parse_memory("12 parsecs").is_err());
        assert_eq!(Memory::gib(16).to_string(), "16Gi");
        assert_eq!(Cpu(1500).to_string(), "1500m");
        assert_eq!(Cpu(2000).to_string(), "2");
    }
}

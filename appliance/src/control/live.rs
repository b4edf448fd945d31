//! Settings that change at run time, mesh-wide: `MeshControl.SetPolicy` writes a key through
//! the control group, and every node applies it when the entry is applied there (and again
//! at start, from the group's state), so the whole mesh runs with one value.
//!
//! Only non-critical settings are live (seed 003: routing coefficients, log level, the join
//! policy); ports, identities, storage and thread counts need a restart.
#![forbid(unsafe_code)]

use meshd_proto::link::JoinPolicy;

/// A cost coefficient of the default routing class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weight {
    /// Latency.
    Alpha,
    /// Inverse bandwidth.
    Beta,
    /// Utilisation.
    Gamma,
    /// Loss.
    Delta,
    /// Per-hop charge.
    Epsilon,
}

/// One live setting, checked.
#[derive(Clone, Debug, PartialEq)]
pub enum LiveSetting {
    /// `routing.alpha` … `routing.epsilon`.
    RoutingWeight(Weight, f64),
    /// `routing.k_paths`: paths computed per destination.
    KPaths(usize),
    /// `log.level`: a tracing filter ("info", "meshd=debug,warn").
    LogLevel(String),
    /// `mesh.join_policy`: OPEN, KEY_REQUIRED or CLOSED.
    JoinPolicy(JoinPolicy),
    /// `membership.probe_period_ms`: SWIM probes one member per period.
    ProbePeriod(std::time::Duration),
    /// `membership.suspect_to_down_ms`: a suspect not refuting for this long is dead.
    SuspectToDown(std::time::Duration),
}

/// Every key `SetPolicy` takes, for error messages and the docs.
pub const KEYS: &[&str] = &[
    "routing.alpha",
    "routing.beta",
    "routing.gamma",
    "routing.delta",
    "routing.epsilon",
    "routing.k_paths",
    "log.level",
    "mesh.join_policy",
    "membership.probe_period_ms",
    "membership.suspect_to_down_ms",
];

/// Checks `key = value`.
pub fn parse(key: &str, value: &str) -> Result<LiveSetting, String> {
    let value = value.trim();
    let weight = |which| {
        let number: f64 = value
            .parse()
            .map_err(|_| format!("{key} = {value:?} is not a number"))?;
        let positive = which == Weight::Epsilon;
        if !number.is_finite() || !(0.0..=1e6).contains(&number) || (positive && number == 0.0) {
            return Err(format!(
                "{key} = {value} is outside 0..=1e6{}",
                if positive {
                    " (and must be above 0)"
                } else {
                    ""
                }
            ));
        }
        Ok(LiveSetting::RoutingWeight(which, number))
    };
    match key {
        "routing.alpha" => weight(Weight::Alpha),
        "routing.beta" => weight(Weight::Beta),
        "routing.gamma" => weight(Weight::Gamma),
        "routing.delta" => weight(Weight::Delta),
        "routing.epsilon" => weight(Weight::Epsilon),
        "routing.k_paths" => match value.parse::<usize>() {
            Ok(k @ 1..=8) => Ok(LiveSetting::KPaths(k)),
            _ => Err(format!("routing.k_paths = {value:?} is not in 1..=8")),
        },
        "log.level" => {
            if value.is_empty() || value.len() > 512 {
                return Err("log.level must be 1..=512 bytes".into());
            }
            tracing_subscriber::EnvFilter::try_new(value)
                .map_err(|e| format!("log.level = {value:?} is not a tracing filter: {e}"))?;
            Ok(LiveSetting::LogLevel(value.to_owned()))
        }
        "mesh.join_policy" => match value {
            "OPEN" => Ok(LiveSetting::JoinPolicy(JoinPolicy::Open)),
            "KEY_REQUIRED" => Ok(LiveSetting::JoinPolicy(JoinPolicy::KeyRequired)),
            "CLOSED" => Ok(LiveSetting::JoinPolicy(JoinPolicy::Closed)),
            _ => Err(format!(
                "mesh.join_policy = {value:?} is not OPEN, KEY_REQUIRED or CLOSED"
            )),
        },
        "membership.probe_period_ms" => match value.parse::<u64>() {
            Ok(ms @ 250..=60_000) => Ok(LiveSetting::ProbePeriod(
                std::time::Duration::from_millis(ms),
            )),
            _ => Err(format!(
                "membership.probe_period_ms = {value:?} is not in 250..=60000"
            )),
        },
        "membership.suspect_to_down_ms" => match value.parse::<u64>() {
            Ok(ms @ 500..=600_000) => Ok(LiveSetting::SuspectToDown(
                std::time::Duration::from_millis(ms),
            )),
            _ => Err(format!(
                "membership.suspect_to_down_ms = {value:?} is not in 500..=600000"
            )),
        },
        _ => Err(format!(
            "{key:?} is not a live setting; these are: {}",
            KEYS.join(", ")
        )),
    }
}

/// Replaces the process's log filter.
pub type LogReloader = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The process's log filter, replaceable at run time (set once by `main`).
static LOG_RELOAD: std::sync::OnceLock<LogReloader> = std::sync::OnceLock::new();

/// Installs how the log filter is replaced (called once, by `main`).
pub fn set_log_reloader(reload: LogReloader) {
    let _ = LOG_RELOAD.set(reload);
}

/// Replaces the log filter; an error when no reloader is installed (tests, tools).
pub fn set_log_level(filter: &str) -> Result<(), String> {
    match LOG_RELOAD.get() {
        Some(reload) => reload(filter),
        None => Err("logging is not reloadable in this process".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_settings_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse("routing.alpha", " 2.5 "),
            Ok(LiveSetting::RoutingWeight(Weight::Alpha, 2.5))
        );
        assert_eq!(parse("routing.k_paths", "3"), Ok(LiveSetting::KPaths(3)));
        assert_eq!(
            parse("mesh.join_policy", "CLOSED"),
            Ok(LiveSetting::JoinPolicy(JoinPolicy::Closed))
        );
        assert!(matches!(
            parse("log.level", "meshd=debug,warn"),
            Ok(LiveSetting::LogLevel(_))
        ));
        for (key, value) in [
            ("routing.alpha", "-1"),
            ("routing.alpha", "NaN"),
            ("routing.epsilon", "0"),
            ("routing.beta", "1e9"),
            ("routing.k_paths", "0"),
            ("routing.k_paths", "100"),
            ("log.level", ""),
            ("log.level", "meshd=[["),
            ("mesh.join_policy", "open"),
            ("grpc.listen", "0.0.0.0:1"),
        ] {
            let error = parse(key, value).expect_err(key);
            assert!(!error.is_empty());
        }
    }
}

//! The environment as configuration reads it: the process's, or a fixed list (tests), each
//! variable named in [`ENV_NAMES`] becoming the field it sets.

use figment::value::{Dict, Value};

use super::ENV_NAMES;

/// Where the environment variables come from.
#[derive(Debug, Clone)]
pub enum Environment {
    /// The process's own (start-up).
    Process,
    /// Exactly these pairs (tests: setting the process's environment while another thread
    /// reads it is undefined behaviour in libc, and crashed a test binary once).
    Fixed(Vec<(String, String)>),
}

impl Environment {
    /// A fixed environment of `pairs`.
    pub fn fixed(pairs: &[(&str, &str)]) -> Self {
        Environment::Fixed(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// The variables, names trimmed; names or values that are not UTF-8 are read lossily.
    pub(super) fn vars(&self) -> Vec<(String, String)> {
        match self {
            Environment::Process => std::env::vars_os()
                .map(|(k, v)| {
                    let key = k.to_string_lossy().trim().to_string();
                    (key, v.to_string_lossy().into_owned())
                })
                .collect(),
            Environment::Fixed(pairs) => pairs
                .iter()
                .map(|(k, v)| (k.trim().to_string(), v.clone()))
                .collect(),
        }
    }
}

/// The variables named in [`ENV_NAMES`] (any case) as a nested table of their fields, each
/// value parsed as figment's environment provider does (`45` a number, `false` a bool).
pub(super) fn env_dict(vars: &[(String, String)]) -> Dict {
    let mut dict = Dict::new();
    for (key, value) in vars {
        let Some((_, field)) = ENV_NAMES
            .iter()
            .find(|(name, _)| key.eq_ignore_ascii_case(name))
        else {
            continue;
        };
        let parsed: Value = match value.parse() {
            Ok(v) => v,
            Err(never) => match never {},
        };
        if let Some(nested) = figment::util::nest(field, parsed).into_dict() {
            for (k, v) in nested {
                merge_into(&mut dict, k, v);
            }
        }
    }
    dict
}

/// Inserts `value` at `key`, merging tables so `server.host` and `server.port` both stay.
fn merge_into(dict: &mut Dict, key: String, value: Value) {
    match (dict.get_mut(&key), value) {
        (Some(Value::Dict(_, old)), Value::Dict(_, new)) => {
            for (k, v) in new {
                merge_into(old, k, v);
            }
        }
        (_, value) => {
            dict.insert(key, value);
        }
    }
}

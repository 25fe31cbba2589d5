//! `tinker://<training_run_id>/<kind>/<name>` checkpoint paths (§7). The run id is the
//! training model's id and is treated as opaque; the checkpoint id is `<kind>/<name>`.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

const SCHEME: &str = "tinker://";

/// What a checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckpointKind {
    /// Training state, from `save_weights` (the SDK's `save_state`): loadable for training.
    Weights,
    /// Weights for sampling, from `save_weights_for_sampler`.
    SamplerWeights,
    /// Weights exported for download.
    ExternalWeights,
}

impl CheckpointKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointKind::Weights => "weights",
            CheckpointKind::SamplerWeights => "sampler_weights",
            CheckpointKind::ExternalWeights => "external_weights",
        }
    }
}

/// A parsed `tinker://` checkpoint path; it prints back to the same string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TinkerPath {
    pub training_run_id: String,
    pub kind: CheckpointKind,
    pub name: String,
}

impl TinkerPath {
    /// `<kind>/<name>`, the id the checkpoint routes take (§6.14).
    pub fn checkpoint_id(&self) -> String {
        format!("{}/{}", self.kind.as_str(), self.name)
    }

    /// The sampler checkpoint of a training state's run and name (`weights/<name>` →
    /// `sampler_weights/<name>`), as a caller that saves both under one name keeps them;
    /// `None` when this is not a training state.
    pub fn sampler_twin(&self) -> Option<TinkerPath> {
        (self.kind == CheckpointKind::Weights).then(|| TinkerPath {
            kind: CheckpointKind::SamplerWeights,
            ..self.clone()
        })
    }
}

impl fmt::Display for TinkerPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/{}",
            self.training_run_id,
            self.checkpoint_id()
        )
    }
}

impl FromStr for TinkerPath {
    type Err = Error;

    /// Exactly three non-empty `/`-separated parts after the scheme, as the SDK requires.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::Config(format!("not a tinker:// checkpoint path: {s:?}"));
        let rest = s.strip_prefix(SCHEME).ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [run, kind, name] = parts[..] else {
            return Err(bad());
        };
        let kind = match kind {
            "weights" => CheckpointKind::Weights,
            "sampler_weights" => CheckpointKind::SamplerWeights,
            "external_weights" => CheckpointKind::ExternalWeights,
            _ => return Err(bad()),
        };
        if run.is_empty() || name.is_empty() {
            return Err(bad());
        }
        Ok(TinkerPath {
            training_run_id: run.to_owned(),
            kind,
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_parses_and_prints_back() -> Result<(), Error> {
        let s = "tinker://sess:train:0/sampler_weights/step-3";
        let p: TinkerPath = s.parse()?;
        assert_eq!(p.training_run_id, "sess:train:0");
        assert_eq!(p.kind, CheckpointKind::SamplerWeights);
        assert_eq!(p.checkpoint_id(), "sampler_weights/step-3");
        assert_eq!(p.to_string(), s);
        Ok(())
    }

    #[test]
    fn paths_without_exactly_three_parts_or_a_known_kind_are_refused() {
        for s in [
            "tinker://run/weights",
            "tinker://run/weights/a/b",
            "tinker://run/other/a",
            "s3://run/weights/a",
            "tinker:///weights/a",
        ] {
            assert!(s.parse::<TinkerPath>().is_err(), "{s}");
        }
    }
}

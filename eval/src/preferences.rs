//! Preferences: what the eval teaches a LoRA and how it checks the lesson. CLaaS's three
//! (`no_emoji`, `concise`, `identity`) are built into the binary ([`builtin`]); a directory
//! (`configs/preferences/` when present, or `--preferences-dir`) adds more or overrides
//! them by name, one YAML file per preference (every `*.yaml` there): the
//! feedback string sent with each sample, log-prob pairs (a prompt with a preferred and a
//! dispreferred answer) for the margin metric, probe prompts to generate from, and the
//! verifier that scores an answer.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::verifiers::Verifier;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogprobPair {
    pub prompt_messages: Vec<Message>,
    pub positive_response: String,
    pub negative_response: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preference {
    pub name: String,
    pub feedback_string: String,
    pub verifier: Verifier,
    pub logprob_pairs: Vec<LogprobPair>,
    pub probe_prompts: Vec<String>,
}

/// Why preferences could not be loaded or chosen.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct PreferenceError(String);

/// The preferences shipped in the binary: CLaaS's three, as `configs/preferences/` has them.
pub fn builtin() -> Result<BTreeMap<String, Preference>, PreferenceError> {
    const SHIPPED: [(&str, &str); 3] = [
        (
            "concise.yaml",
            include_str!("../../configs/preferences/concise.yaml"),
        ),
        (
            "identity.yaml",
            include_str!("../../configs/preferences/identity.yaml"),
        ),
        (
            "no_emoji.yaml",
            include_str!("../../configs/preferences/no_emoji.yaml"),
        ),
    ];
    let mut out = BTreeMap::new();
    for (file, text) in SHIPPED {
        let p = parse(text, &format!("built-in {file}"))?;
        out.insert(p.name.clone(), p);
    }
    Ok(out)
}

/// The built-in preferences, then those in `dir` (when given), which add to them or replace
/// one of the same name.
pub fn with_builtin(dir: Option<&Path>) -> Result<BTreeMap<String, Preference>, PreferenceError> {
    let mut all = builtin()?;
    if let Some(dir) = dir {
        all.extend(load_dir(dir)?);
    }
    Ok(all)
}

/// One preference from YAML `text`; `source` names it in errors.
fn parse(text: &str, source: &str) -> Result<Preference, PreferenceError> {
    let p: Preference =
        serde_yaml::from_str(text).map_err(|e| PreferenceError(format!("{source}: {e}")))?;
    if p.probe_prompts.is_empty() {
        return Err(PreferenceError(format!("{source}: probe_prompts is empty")));
    }
    Ok(p)
}

/// Every preference in `dir`, by name. A file that does not parse, a preference with no
/// probe prompts, or two files with one name is an error naming the file.
pub fn load_dir(dir: &Path) -> Result<BTreeMap<String, Preference>, PreferenceError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| PreferenceError(format!("preferences directory {}: {e}", dir.display())))?;
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut out = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| PreferenceError(format!("{}: {e}", file.display())))?;
        let p = parse(&text, &file.display().to_string())?;
        if let Some(other) = out.insert(p.name.clone(), p) {
            return Err(PreferenceError(format!(
                "{}: a second preference named '{}'",
                file.display(),
                other.name
            )));
        }
    }
    Ok(out)
}

/// The preferences `names` asks for, in that order; an unknown name is an error listing
/// the known ones.
pub fn select(
    all: &BTreeMap<String, Preference>,
    names: &[String],
) -> Result<Vec<Preference>, PreferenceError> {
    names
        .iter()
        .map(|n| {
            all.get(n).cloned().ok_or_else(|| {
                PreferenceError(format!(
                    "unknown preference '{n}' (known: {})",
                    all.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_preferences_need_no_directory_and_equal_the_shipped_files() {
        let builtin = with_builtin(None).expect("built in");
        assert_eq!(
            builtin,
            shipped(),
            "the binary carries configs/preferences as it is"
        );
    }

    #[test]
    fn a_directory_adds_preferences_and_overrides_builtin_ones_by_name() {
        let dir = claas_testutil::tempdir("prefs");
        let mut concise = shipped()["concise"].clone();
        concise.feedback_string = "Be terser still.".into();
        let mut mine = concise.clone();
        mine.name = "formal".into();
        for p in [&concise, &mine] {
            let yaml = serde_yaml::to_string(p).expect("yaml");
            std::fs::write(dir.join(format!("{}.yaml", p.name)), yaml).expect("write");
        }
        let all = with_builtin(Some(&dir)).expect("load");
        assert_eq!(
            all.keys().collect::<Vec<_>>(),
            ["concise", "formal", "identity", "no_emoji"]
        );
        assert_eq!(all["concise"].feedback_string, "Be terser still.");
    }

    fn shipped() -> BTreeMap<String, Preference> {
        load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/preferences"))
            .expect("the shipped preferences load")
    }

    #[test]
    fn the_three_claas_preferences_ship_and_their_pairs_pass_their_own_verifiers() {
        let all = shipped();
        assert_eq!(
            all.keys().collect::<Vec<_>>(),
            ["concise", "identity", "no_emoji"]
        );
        for p in all.values() {
            assert_eq!(p.probe_prompts.len(), 10, "{}", p.name);
            for pair in &p.logprob_pairs {
                assert!(
                    p.verifier.check(&pair.positive_response).passed,
                    "{}: positive",
                    p.name
                );
                assert!(
                    !p.verifier.check(&pair.negative_response).passed,
                    "{}: negative",
                    p.name
                );
            }
        }
        assert_eq!(
            all["no_emoji"].feedback_string,
            "Don't use any emojis in your responses"
        );
        assert_eq!(
            all["concise"].feedback_string,
            "Be more concise, keep responses under 3 sentences"
        );
        assert_eq!(
            all["identity"].feedback_string,
            "Your name is Kuro, always introduce yourself as Kuro"
        );
    }

    #[test]
    fn unknown_names_duplicates_and_bad_files_are_errors() {
        let all = shipped();
        let picked = select(&all, &["no_emoji".into()]).expect("known");
        assert_eq!(picked[0].name, "no_emoji");
        let e = select(&all, &["sarcasm".into()]).expect_err("unknown");
        assert_eq!(
            e.to_string(),
            "unknown preference 'sarcasm' (known: concise, identity, no_emoji)"
        );

        let dir = claas_testutil::tempdir("prefs");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/preferences/concise.yaml");
        std::fs::copy(&src, dir.join("a.yaml")).expect("copy");
        std::fs::copy(&src, dir.join("b.yaml")).expect("copy");
        let e = load_dir(&dir).expect_err("duplicate");
        assert!(
            e.to_string()
                .contains("a second preference named 'concise'"),
            "{e}"
        );
        std::fs::write(dir.join("b.yaml"), "name: x\nfeedback: y\n").expect("write");
        let e = load_dir(&dir).expect_err("bad file");
        assert!(e.to_string().contains("b.yaml"), "{e}");
    }
}

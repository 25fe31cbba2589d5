//! The text measurements of CLaaS's eval metrics: sentences, word-level ROUGE-L, the
//! entropy of top log-probs, the IFEval-style checks and the coding probe (its Python run
//! by `python3 -I` with limited builtins inside the bubblewrap sandbox of [`crate::sandbox`],
//! and never outside it).

use std::sync::OnceLock;

use regex::Regex;

use crate::sandbox::{self, Outcome};

/// Limits of one run of answer code (see [`crate::sandbox`]).
pub use crate::sandbox::Limits as Sandbox;

fn sentence_end() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"[.!?]+(?:\s|$)").expect("valid regex"))
}

/// The sentences of `text`: pieces between runs of `.`, `!` or `?` followed by whitespace
/// or the end (a last piece without a mark counts too).
pub fn sentences(text: &str) -> Vec<&str> {
    sentence_end()
        .split(text.trim())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// Word-level ROUGE-L F1 of `b` against `a`: the longest common subsequence of their
/// whitespace-separated words, precision over `b`'s length, recall over `a`'s.
pub fn rouge_l_f1(a: &str, b: &str) -> f64 {
    let x: Vec<&str> = a.split_whitespace().collect();
    let y: Vec<&str> = b.split_whitespace().collect();
    if x.is_empty() || y.is_empty() {
        return 0.0;
    }
    let mut prev = vec![0usize; y.len() + 1];
    let mut row = vec![0usize; y.len() + 1];
    for xi in &x {
        for (j, yj) in y.iter().enumerate() {
            row[j + 1] = if xi == yj {
                prev[j] + 1
            } else {
                row[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut row);
    }
    let lcs = prev[y.len()] as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let (p, r) = (lcs / y.len() as f64, lcs / x.len() as f64);
    2.0 * p * r / (p + r)
}

/// Mean pairwise ROUGE-L F1 over every pair of responses (0 with fewer than two): high
/// means the samples say the same thing, a collapse signal.
pub fn self_rouge_l(responses: &[String]) -> f64 {
    let mut sum = 0.0;
    let mut pairs = 0usize;
    for i in 0..responses.len() {
        for j in i + 1..responses.len() {
            sum += rouge_l_f1(&responses[i], &responses[j]);
            pairs += 1;
        }
    }
    if pairs == 0 {
        0.0
    } else {
        sum / pairs as f64
    }
}

/// Mean entropy (nats) over tokens of each token's top log-probs, renormalised to sum to 1.
pub fn mean_entropy(top_logprobs: &[Vec<f64>]) -> f64 {
    let per_token: Vec<f64> = top_logprobs
        .iter()
        .filter(|t| !t.is_empty())
        .map(|t| {
            let probs: Vec<f64> = t.iter().map(|lp| lp.exp()).collect();
            let total: f64 = probs.iter().sum();
            if total <= 0.0 {
                return 0.0;
            }
            -probs
                .iter()
                .map(|p| p / total)
                .filter(|p| *p > 0.0)
                .map(|p| p * p.ln())
                .sum::<f64>()
        })
        .collect();
    if per_token.is_empty() {
        0.0
    } else {
        per_token.iter().sum::<f64>() / per_token.len() as f64
    }
}

/// IFEval-style probe: "Write exactly 3 sentences about Python."
pub fn has_exactly_three_sentences(text: &str) -> bool {
    sentences(text).len() == 3
}

/// IFEval-style probe: "List 5 benefits of exercise. Use numbered list." (≥ 5 items).
pub fn numbered_items(text: &str) -> usize {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(r"^\s*\d+[.)]\s+").expect("valid regex"));
    text.lines().filter(|l| re.is_match(l)).count()
}

/// IFEval-style probe: "Explain recursion without using the word 'function'."
pub fn avoids_word(text: &str, word: &str) -> bool {
    !text.to_lowercase().contains(&word.to_lowercase())
}

/// The Python code of an answer: its first ```` ```python ```` block, else its first
/// fenced block, else the lines from its first `def` through that function's body.
pub fn extract_code(text: &str) -> Option<String> {
    for opener in ["```python", "```py\n", "```"] {
        if let Some(start) = text.find(opener) {
            let body = &text[start + opener.len()..];
            let body = body.strip_prefix('\n').unwrap_or(body);
            let end = body.find("```").unwrap_or(body.len());
            let code = body[..end].trim_end();
            if !code.trim().is_empty() {
                return Some(format!("{code}\n"));
            }
        }
    }
    let lines: Vec<&str> = text.lines().collect();
    let first = lines
        .iter()
        .position(|l| l.trim_start().starts_with("def "))?;
    let mut code = vec![lines[first]];
    for l in &lines[first + 1..] {
        if !l.trim().is_empty() && !l.starts_with(char::is_whitespace) {
            break;
        }
        code.push(l);
    }
    Some(format!("{}\n", code.join("\n").trim_end()))
}

/// Whether the code has a docstring (triple quotes of either kind).
pub fn has_docstring(code: &str) -> bool {
    code.contains("\"\"\"") || code.contains("'''")
}

/// What running the coding probe's answer found.
#[derive(Debug, Clone, PartialEq)]
pub enum CodeVerdict {
    /// `fibonacci(0) == 0`, `fibonacci(1) == 1` and `fibonacci(10) == 55`.
    Correct,
    Incorrect(String),
    /// The check could not run (no sandbox here, or no python3 inside it): reported, not
    /// counted as a failure, and the code was not run.
    Unavailable(String),
}

/// Runs the code from stdin with the builtins limited to what CLaaS allows (an inner layer:
/// the sandbox is the boundary); prints `ok` or the reason it is wrong.
const FIB_CHECK: &str = r#"
import sys
code = sys.stdin.read()
allowed = {n: __builtins__.__dict__[n] for n in ("abs", "int", "len", "max", "min", "range", "sum")}
env = {"__builtins__": allowed}
try:
    exec(code, env)
    fib = env.get("fibonacci")
    if fib is None:
        print("no function named fibonacci")
    else:
        got = (fib(0), fib(1), fib(10))
        print("ok" if got == (0, 1, 55) else "fibonacci(0, 1, 10) gave %r" % (got,))
except BaseException as e:
    print("raised %s: %s" % (type(e).__name__, e))
"#;

/// Runs `code` under `python` (normally `python3`, looked up in the sandbox's `/usr/bin`)
/// in isolated mode inside the sandbox and checks its `fibonacci`.
pub fn check_fibonacci(python: &str, code: &str, sandbox: Sandbox) -> CodeVerdict {
    match sandbox::run(python, &["-I", "-c", FIB_CHECK], code.as_bytes(), sandbox) {
        Outcome::Unavailable(why) => CodeVerdict::Unavailable(why),
        Outcome::TimedOut => CodeVerdict::Incorrect(format!(
            "did not finish within {} s",
            sandbox.timeout.as_secs_f64()
        )),
        Outcome::Finished(out) => match out.trim() {
            "ok" => CodeVerdict::Correct,
            "" => CodeVerdict::Incorrect("killed (time or memory limit)".into()),
            other => CodeVerdict::Incorrect(other.to_owned()),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::Duration;

    use super::*;

    #[test]
    fn rouge_l_table() {
        let cases: [(&str, &str, f64); 6] = [
            ("the cat sat on the mat", "the cat sat on the mat", 1.0),
            ("the cat sat", "the dog ran", 1.0 / 3.0),
            // LCS "the cat the mat" = 4; precision 4/5, recall 4/6.
            (
                "the cat sat on the mat",
                "the cat and the mat",
                2.0 * 0.8 * (4.0 / 6.0) / (0.8 + 4.0 / 6.0),
            ),
            ("a b c", "x y z", 0.0),
            ("", "anything", 0.0),
            ("b a", "a b", 0.5),
        ];
        for (a, b, want) in cases {
            let got = rouge_l_f1(a, b);
            assert!(
                (got - want).abs() < 1e-12,
                "{a:?} vs {b:?}: {got} != {want}"
            );
        }
        let same = vec!["one two three".to_string(); 3];
        assert_eq!(self_rouge_l(&same), 1.0);
        assert_eq!(self_rouge_l(&same[..1]), 0.0);
        let mixed = ["a b".to_string(), "a b".to_string(), "c d".to_string()];
        assert!((self_rouge_l(&mixed) - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn entropy_of_renormalised_top_logprobs() {
        let uniform4 = vec![(0.25f64).ln(); 4];
        assert!((mean_entropy(std::slice::from_ref(&uniform4)) - 4f64.ln()).abs() < 1e-12);
        // Renormalised: two tokens at 0.1 each are a fair coin.
        let coin = vec![(0.1f64).ln(), (0.1f64).ln()];
        assert!((mean_entropy(&[coin]) - 2f64.ln()).abs() < 1e-12);
        let certain = vec![0.0];
        assert_eq!(mean_entropy(std::slice::from_ref(&certain)), 0.0);
        assert!((mean_entropy(&[uniform4, certain]) - 4f64.ln() / 2.0).abs() < 1e-12);
        assert_eq!(mean_entropy(&[]), 0.0);
    }

    #[test]
    fn ifeval_checks() {
        assert!(has_exactly_three_sentences(
            "Python is fun. It is popular! Is it fast?"
        ));
        assert!(!has_exactly_three_sentences(
            "Python is fun. It is popular."
        ));
        assert!(!has_exactly_three_sentences("One. Two. Three. Four."));
        let list = "Benefits:\n1. Health\n2) Mood\n 3. Sleep\n4. Energy\n5. Focus\n";
        assert_eq!(numbered_items(list), 5);
        assert_eq!(numbered_items("1.Health\n- Mood"), 0);
        assert!(avoids_word(
            "Recursion is when a procedure calls itself.",
            "function"
        ));
        assert!(!avoids_word(
            "A recursive Function calls itself.",
            "function"
        ));
    }

    #[test]
    fn code_is_extracted_from_fences_or_a_def() {
        let fenced = "Here:\n```python\ndef fibonacci(n):\n    return n\n```\nDone.";
        assert_eq!(
            extract_code(fenced).as_deref(),
            Some("def fibonacci(n):\n    return n\n")
        );
        let bare = "```\nx = 1\n```";
        assert_eq!(extract_code(bare).as_deref(), Some("x = 1\n"));
        let plain = "Sure.\ndef fibonacci(n):\n    \"\"\"Doc.\"\"\"\n\n    return n\nThat is it.";
        let code = extract_code(plain).expect("def");
        assert_eq!(
            code,
            "def fibonacci(n):\n    \"\"\"Doc.\"\"\"\n\n    return n\n"
        );
        assert!(has_docstring(&code));
        assert_eq!(extract_code("no code here"), None);
    }

    /// Whether a sandbox must work here: a bwrap named in `CLAAS_EVAL_BWRAP`, or one on `PATH`.
    fn bwrap_expected() -> bool {
        let on_path = || Command::new("bwrap").arg("--version").output().is_ok();
        std::env::var_os(sandbox::BWRAP_ENV).is_some() || on_path()
    }

    #[test]
    fn fibonacci_answers_are_run_in_a_sandbox() {
        let python = "python3";
        if !bwrap_expected() {
            // The harness reports the probe unavailable then; that path is checked below.
            eprintln!("bwrap is absent (scripts/test-sandbox.sh installs it): only the unavailable verdict is checked");
        } else {
            let good = "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n";
            assert_eq!(
                check_fibonacci(python, good, Sandbox::default()),
                CodeVerdict::Correct
            );
            let wrong = "def fibonacci(n):\n    return n\n";
            assert!(
                matches!(check_fibonacci(python, wrong, Sandbox::default()), CodeVerdict::Incorrect(m) if m.contains("gave (0, 1, 10)"))
            );
            let escape = "import os\ndef fibonacci(n):\n    return 0\n";
            assert!(
                matches!(check_fibonacci(python, escape, Sandbox::default()), CodeVerdict::Incorrect(m) if m.contains("ImportError")),
                "no imports: the builtins are limited"
            );
            let spin = "def fibonacci(n):\n    while True:\n        pass\n";
            let fast = Sandbox {
                timeout: Duration::from_secs(1),
                ..Sandbox::default()
            };
            assert!(matches!(
                check_fibonacci(python, spin, fast),
                CodeVerdict::Incorrect(_)
            ));
            let hog = "def fibonacci(n):\n    return len([0] * (10 ** 9))\n";
            assert!(
                matches!(check_fibonacci(python, hog, Sandbox::default()), CodeVerdict::Incorrect(m) if m.contains("MemoryError"))
            );
        }
        assert!(matches!(
            check_fibonacci("/nonexistent/python3", "", Sandbox::default()),
            CodeVerdict::Unavailable(_)
        ));
    }
}

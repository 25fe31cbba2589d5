//! The SDPO loss against the golden cases (`tests/fixtures/sdpo_loss/cases.json`, from the
//! project's PyTorch reference, and the reference implementation's
//! `../shared/fixtures/sdpo_loss/cases.json` where present): every scalar and
//! d loss / d student logits.

use candle_core::{DType, Device, Tensor, Var};
use claas_trainer::loss::{sdpo_loss, LossConfig, LossInputs};
use serde_json::Value;

/// `tests/fixtures`, then `../shared/fixtures` when present.
fn roots() -> Vec<std::path::PathBuf> {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let shared = repo.join("../shared/fixtures");
    let mut roots = vec![repo.join("tests/fixtures")];
    if shared.is_dir() {
        roots.push(shared);
    }
    roots
}

/// Flattens a nested JSON array of numbers.
fn flat(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flat(i, out)),
        Value::Number(n) => out.push(n.as_f64().expect("number")),
        other => panic!("not a number: {other}"),
    }
}

fn tensor(v: &Value, dims: &[usize], dtype: DType) -> Tensor {
    let mut data = Vec::new();
    flat(v, &mut data);
    let t = Tensor::from_vec(data, dims, &Device::Cpu).expect("tensor");
    t.to_dtype(dtype).expect("dtype")
}

fn close(got: f64, want: f64, rel: f64, what: &str) {
    let tol = rel * want.abs().max(1e-3);
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got}, want {want} (tolerance {tol})"
    );
}

#[test]
fn every_reference_case_matches_scalars_and_gradient() {
    for root in roots() {
        let path = root.join("sdpo_loss/cases.json");
        let text = std::fs::read_to_string(&path).expect("cases");
        let doc: Value = serde_json::from_str(&text).expect("json");
        let cases = doc["cases"].as_array().expect("cases");
        assert_eq!(cases.len(), 6, "{}", path.display());
        for case in cases {
            check_case(&format!("{}: {}", path.display(), case["name"]), case);
        }
    }
}

fn check_case(name: &str, case: &Value) {
    let dim = |k: &str| case["shape"][k].as_u64().expect("dim") as usize;
    let (b, t, v, k) = (dim("B"), dim("T"), dim("V"), dim("K"));
    let inp = &case["inputs"];
    let logits =
        Var::from_tensor(&tensor(&inp["student_logits"], &[b, t, v], DType::F32)).expect("var");
    let teacher_lp = tensor(&inp["teacher_logprobs"], &[b, t, k], DType::F32);
    let teacher_ix = tensor(&inp["teacher_indices"], &[b, t, k], DType::U32);
    let base = tensor(&inp["base_logprobs"], &[b, t], DType::F32);
    let old = tensor(&inp["old_student_logprobs"], &[b, t], DType::F32);
    let ids = tensor(&inp["response_ids"], &[b, t], DType::U32);
    let mask = tensor(&inp["response_mask"], &[b, t], DType::F32);
    let tr = &case["training"];
    let cfg = LossConfig {
        alpha: tr["alpha"].as_f64().expect("alpha"),
        is_clip: tr["is_clip"].as_f64().expect("is_clip"),
        kl_reg_weight: tr["kl_reg_weight"].as_f64().expect("kl"),
    };
    let out = sdpo_loss(
        &LossInputs {
            student_logits: logits.as_tensor(),
            teacher_logprobs: &teacher_lp,
            teacher_indices: &teacher_ix,
            base_logprobs: &base,
            old_logprobs: &old,
            response_ids: &ids,
            response_mask: &mask,
        },
        &cfg,
    )
    .expect("loss");
    let exp = &case["expected"];
    let want = |k: &str| exp[k].as_f64().expect("expected scalar");
    let loss = out.loss.to_scalar::<f32>().expect("scalar") as f64;
    close(loss, want("loss"), 1e-5, &format!("{name} loss"));
    close(
        out.distill_loss,
        want("distill_loss"),
        1e-5,
        &format!("{name} distill_loss"),
    );
    close(out.kl_reg, want("kl_reg"), 1e-5, &format!("{name} kl_reg"));
    close(
        out.mean_is_ratio,
        want("mean_is_ratio"),
        1e-5,
        &format!("{name} mean_is_ratio"),
    );
    close(
        out.clip_fraction,
        want("clip_fraction"),
        1e-5,
        &format!("{name} clip_fraction"),
    );

    let grads = out.loss.backward().expect("backward");
    let grad = grads
        .get(logits.as_tensor())
        .expect("a gradient for the logits");
    let got: Vec<f32> = grad.flatten_all().expect("flat").to_vec1().expect("vec");
    let mut want_grad = Vec::new();
    flat(&exp["grad_student_logits"], &mut want_grad);
    assert_eq!(got.len(), want_grad.len());
    let worst = got
        .iter()
        .zip(&want_grad)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    assert!(
        worst <= 1e-5,
        "{name}: max |d loss/d logits - reference| = {worst}"
    );
}

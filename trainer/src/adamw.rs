//! AdamW with PyTorch's semantics (decoupled weight decay, bias correction as
//! `torch.optim.AdamW` computes it) and state that is saved beside the adapter.
//!
//! candle_nn's AdamW hides its moments, so its state could not travel with a version. The
//! learning rate is not part of the state: every step uses the request's (restoring torch
//! optimizer state silently brings back the first request's learning rate).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{checkpoint, Result};

/// One parameter's moments and step count.
struct Moments {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
}

/// AdamW over named parameters (betas 0.9/0.999, eps 1e-8, weight decay 0.01 by default).
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    state: BTreeMap<String, Moments>,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            state: BTreeMap::new(),
        }
    }
}

/// The file the state is saved in, beside `adapter_model.safetensors`.
pub const STATE_FILE: &str = "optimizer_state.safetensors";

impl AdamW {
    /// One step with learning rate `lr` for every parameter that has a gradient.
    pub fn step(
        &mut self,
        params: &BTreeMap<String, Var>,
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
    ) -> Result<()> {
        for (name, var) in params {
            let Some(grad) = grads.get(name) else {
                continue;
            };
            let m = match self.state.get_mut(name) {
                Some(m) => m,
                None => self.state.entry(name.clone()).or_insert(Moments {
                    exp_avg: grad.zeros_like()?,
                    exp_avg_sq: grad.zeros_like()?,
                    step: 0,
                }),
            };
            m.step += 1;
            let t = m.step as f64;
            let param = (var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            // exp_avg.lerp_(grad, 1 - beta1)
            m.exp_avg = (&m.exp_avg + ((grad - &m.exp_avg)? * (1.0 - self.beta1))?)?;
            m.exp_avg_sq = ((&m.exp_avg_sq * self.beta2)? + (grad.sqr()? * (1.0 - self.beta2))?)?;
            let bias1 = 1.0 - self.beta1.powf(t);
            let bias2_sqrt = (1.0 - self.beta2.powf(t)).sqrt();
            let denom = ((m.exp_avg_sq.sqrt()? / bias2_sqrt)? + self.eps)?;
            let update = ((&m.exp_avg / denom)? * (lr / bias1))?;
            var.set(&(param - update)?)?;
        }
        Ok(())
    }

    /// Writes `<key>.exp_avg`, `<key>.exp_avg_sq` and `<key>.step` per parameter.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut out = HashMap::new();
        for (k, m) in &self.state {
            out.insert(format!("{k}.exp_avg"), m.exp_avg.to_device(&Device::Cpu)?);
            out.insert(
                format!("{k}.exp_avg_sq"),
                m.exp_avg_sq.to_device(&Device::Cpu)?,
            );
            out.insert(
                format!("{k}.step"),
                Tensor::new(&[m.step as f32], &Device::Cpu)?,
            );
        }
        candle_core::safetensors::save(&out, path)?;
        Ok(())
    }

    /// Reads state saved by [`AdamW::save`] for the parameters in `params`.
    pub fn load(path: &Path, params: &BTreeMap<String, Var>, device: &Device) -> Result<Self> {
        let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| checkpoint(format!("cannot read {}: {e}", path.display())))?;
        let mut opt = AdamW::default();
        for (k, var) in params {
            let mut take = |suffix: &str| {
                tensors
                    .remove(&format!("{k}.{suffix}"))
                    .ok_or_else(|| checkpoint(format!("{} has no {k}.{suffix}", path.display())))
            };
            let (Ok(exp_avg), Ok(exp_avg_sq), Ok(step)) =
                (take("exp_avg"), take("exp_avg_sq"), take("step"))
            else {
                // A parameter the state does not know starts fresh (as torch does).
                continue;
            };
            if exp_avg.dims() != var.dims() || exp_avg_sq.dims() != var.dims() {
                return Err(checkpoint(format!(
                    "{}: moments of {k} have shape {:?}, the adapter has {:?}",
                    path.display(),
                    exp_avg.dims(),
                    var.dims()
                )));
            }
            let step = step.flatten_all()?.to_vec1::<f32>()?;
            opt.state.insert(
                k.clone(),
                Moments {
                    exp_avg: exp_avg.to_dtype(DType::F32)?.to_device(device)?,
                    exp_avg_sq: exp_avg_sq.to_dtype(DType::F32)?.to_device(device)?,
                    step: step.first().copied().unwrap_or(0.0) as u64,
                },
            );
        }
        Ok(opt)
    }
}

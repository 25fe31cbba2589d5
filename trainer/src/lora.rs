//! LoRA adapters in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`),
//! the format vLLM and python peft load.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::config::{Module, Qwen3Config};
use crate::error::{checkpoint, invalid, Result};

/// The fields of `adapter_config.json` that matter here; the rest is written as PEFT does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

impl AdapterConfig {
    /// The configuration of a stored LoRA (`rank` and `alpha` as the queue records them,
    /// plain LoRA scaling, its base model named): what the API, the embedded engine and the
    /// worker all write into `adapter_config.json`. A negative rank becomes 0, which
    /// [`LoraAdapter::init`] refuses.
    pub fn for_lora(rank: i32, alpha: f64, target_modules: Vec<String>, base_model: &str) -> Self {
        AdapterConfig {
            r: usize::try_from(rank).unwrap_or(0),
            lora_alpha: alpha,
            target_modules,
            use_rslora: false,
            base_model_name_or_path: Some(base_model.to_owned()),
        }
    }

    /// PEFT's scaling: `lora_alpha / r` (`/ sqrt(r)` with rsLoRA).
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    fn modules(&self) -> Result<Vec<Module>> {
        self.target_modules
            .iter()
            .map(|name| {
                Module::parse(name).ok_or_else(|| {
                    invalid(format!(
                        "target module {name:?} is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
                    ))
                })
            })
            .collect()
    }
}

/// PEFT's key for a LoRA matrix (`A` or `B`) of one projection.
pub fn peft_key(layer: usize, m: Module, ab: char) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}.lora_{ab}.weight",
        m.block(),
        m.name()
    )
}

/// A LoRA adapter's trainable tensors (f32 `Var`s), by PEFT key.
pub struct LoraAdapter {
    pub config: AdapterConfig,
    params: BTreeMap<String, Var>,
    /// `[layer][module]` → (A, B).
    index: Vec<[Option<(Var, Var)>; 7]>,
    scaling: f64,
}

impl LoraAdapter {
    /// A fresh adapter as PEFT initialises one: A Kaiming-uniform (bound `1/sqrt(in)`),
    /// B zero, so the adapted model starts equal to the base. Shapes follow `model`'s
    /// config (any `head_dim`).
    pub fn init(model: &Qwen3Config, config: AdapterConfig, seed: u64) -> Result<Self> {
        let modules = config.modules()?;
        if config.r == 0 {
            return Err(invalid("LoRA rank r must be positive"));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        for layer in 0..model.num_hidden_layers {
            for &m in &modules {
                let (inp, out) = model.shape_of(m);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..config.r * inp)
                    .map(|_| rng.gen_range(-bound..bound))
                    .collect();
                tensors.insert(
                    peft_key(layer, m, 'A'),
                    Tensor::from_vec(a, (config.r, inp), &Device::Cpu)?,
                );
                tensors.insert(
                    peft_key(layer, m, 'B'),
                    Tensor::zeros((out, config.r), DType::F32, &Device::Cpu)?,
                );
            }
        }
        Self::from_tensors(model, config, tensors, &Device::Cpu)
    }

    /// Reads a PEFT adapter directory.
    pub fn load(dir: &Path, model: &Qwen3Config, device: &Device) -> Result<Self> {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| checkpoint(format!("cannot read {}: {e}", path.display())))?;
        let config: AdapterConfig = serde_json::from_str(&text)
            .map_err(|e| checkpoint(format!("{}: {e}", path.display())))?;
        let file = dir.join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&file, &Device::Cpu)
            .map_err(|e| checkpoint(format!("cannot read {}: {e}", file.display())))?;
        Self::from_tensors(model, config, tensors, device)
    }

    /// A copy of these weights in variables of its own: training the copy (or this one)
    /// leaves the other as it was.
    pub fn snapshot(&self, model: &Qwen3Config) -> Result<Self> {
        let mut tensors = HashMap::new();
        for (key, var) in &self.params {
            tensors.insert(key.clone(), var.as_tensor().copy()?);
        }
        let device = self
            .params
            .values()
            .next()
            .map_or(Device::Cpu, |v| v.device().clone());
        Self::from_tensors(model, self.config.clone(), tensors, &device)
    }

    fn from_tensors(
        model: &Qwen3Config,
        config: AdapterConfig,
        mut tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let modules = config.modules()?;
        let mut params = BTreeMap::new();
        let mut index = Vec::with_capacity(model.num_hidden_layers);
        for layer in 0..model.num_hidden_layers {
            let mut row: [Option<(Var, Var)>; 7] = Default::default();
            for &m in &modules {
                let (inp, out) = model.shape_of(m);
                let mut var = |ab: char, shape: [usize; 2]| -> Result<Var> {
                    let key = peft_key(layer, m, ab);
                    let t = tensors
                        .remove(&key)
                        .ok_or_else(|| checkpoint(format!("adapter has no tensor {key}")))?;
                    if t.dims() != shape {
                        return Err(checkpoint(format!(
                            "{key} has shape {:?}, the base model implies {shape:?}",
                            t.dims()
                        )));
                    }
                    let v = Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(device)?)?;
                    params.insert(key, v.clone());
                    Ok(v)
                };
                let a = var('A', [config.r, inp])?;
                let b = var('B', [out, config.r])?;
                row[m.index()] = Some((a, b));
            }
            index.push(row);
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(checkpoint(format!(
                "adapter tensor {extra} does not belong to its config's target modules"
            )));
        }
        let scaling = config.scaling();
        Ok(LoraAdapter {
            config,
            params,
            index,
            scaling,
        })
    }

    /// `(A, B, scaling)` of one projection, if the adapter targets it.
    pub fn pair(&self, layer: usize, m: Module) -> Option<(&Tensor, &Tensor, f64)> {
        self.index
            .get(layer)
            .and_then(|row| row[m.index()].as_ref())
            .map(|(a, b)| (a.as_tensor(), b.as_tensor(), self.scaling))
    }

    /// The trainable tensors by PEFT key.
    pub fn params(&self) -> &BTreeMap<String, Var> {
        &self.params
    }

    /// Number of trainable values.
    pub fn num_params(&self) -> usize {
        self.params.values().map(|v| v.elem_count()).sum()
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let config = serde_json::json!({
            "base_model_name_or_path": self.config.base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": false,
            "init_lora_weights": true,
            "lora_alpha": self.config.lora_alpha,
            "lora_dropout": 0.0,
            "peft_type": "LORA",
            "r": self.config.r,
            "target_modules": self.config.target_modules,
            "task_type": "CAUSAL_LM",
            "use_rslora": self.config.use_rslora,
        });
        std::fs::write(
            dir.join("adapter_config.json"),
            serde_json::to_vec_pretty(&config)?,
        )?;
        let tensors: HashMap<String, Tensor> = self
            .params
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
        Ok(())
    }
}

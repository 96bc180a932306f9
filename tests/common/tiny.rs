//! A tiny random Llama written as a Hugging Face folder (config.json, f32 safetensors in HF
//! layout, tokenizer.json), plus a plain f64 reference forward pass that shares no code with the
//! model: HF's rotate-half RoPE on un-permuted weights, explicit loops everywhere.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub struct TinySpec {
    pub vocab: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub theta: f64,
    pub window: Option<usize>,
    pub tied: bool,
    pub eps: f64,
}

impl TinySpec {
    /// GQA (4 query heads on 2 KV heads) and a sliding window shorter than the test prompts.
    /// The vocabulary matches the SmolLM2 tokenizer written beside it.
    pub fn standard() -> Self {
        Self { vocab: 49152, hidden: 64, ffn: 96, layers: 3, heads: 4, kv_heads: 2, theta: 10_000.0, window: Some(8), tied: false, eps: 1e-5 }
    }
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// Weights in HF naming and layout, as f64 row-major matrices `[out][in]`.
pub struct TinyWeights {
    pub spec: TinySpec,
    pub t: HashMap<String, (Vec<usize>, Vec<f64>)>,
}

impl TinyWeights {
    pub fn random(spec: TinySpec, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut t = HashMap::new();
        type Map = HashMap<String, (Vec<usize>, Vec<f64>)>;
        fn mat(t: &mut Map, name: String, rows: usize, cols: usize, scale: f64, rng: &mut ChaCha8Rng) {
            let v: Vec<f64> = (0..rows * cols).map(|_| (rng.random::<f64>() * 2.0 - 1.0) * scale).collect();
            t.insert(name, (vec![rows, cols], v));
        }
        let (h, kv) = (spec.hidden, spec.kv_heads * spec.head_dim());
        mat(&mut t, "model.embed_tokens.weight".into(), spec.vocab, h, 1.0, &mut rng);
        for i in 0..spec.layers {
            let p = format!("model.layers.{i}");
            let s = 1.0 / (h as f64).sqrt();
            mat(&mut t, format!("{p}.self_attn.q_proj.weight"), h, h, s, &mut rng);
            mat(&mut t, format!("{p}.self_attn.k_proj.weight"), kv, h, s, &mut rng);
            mat(&mut t, format!("{p}.self_attn.v_proj.weight"), kv, h, s, &mut rng);
            mat(&mut t, format!("{p}.self_attn.o_proj.weight"), h, h, s, &mut rng);
            mat(&mut t, format!("{p}.mlp.gate_proj.weight"), spec.ffn, h, s, &mut rng);
            mat(&mut t, format!("{p}.mlp.up_proj.weight"), spec.ffn, h, s, &mut rng);
            mat(&mut t, format!("{p}.mlp.down_proj.weight"), h, spec.ffn, 1.0 / (spec.ffn as f64).sqrt(), &mut rng);
            for n in ["input_layernorm", "post_attention_layernorm"] {
                let v: Vec<f64> = (0..h).map(|_| 0.5 + rng.random::<f64>()).collect();
                t.insert(format!("{p}.{n}.weight"), (vec![h], v));
            }
        }
        let v: Vec<f64> = (0..h).map(|_| 0.5 + rng.random::<f64>()).collect();
        t.insert("model.norm.weight".into(), (vec![h], v));
        if !spec.tied {
            mat(&mut t, "lm_head.weight".into(), spec.vocab, h, 1.0 / (h as f64).sqrt(), &mut rng);
        }
        Self { spec, t }
    }

    /// Write config.json, model.safetensors (f32) and tokenizer.json into `dir`.
    pub fn write_hf_folder(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        let s = &self.spec;
        let mut cfg = serde_json::json!({
            "architectures": ["MistralForCausalLM"], "model_type": "mistral",
            "hidden_size": s.hidden, "intermediate_size": s.ffn, "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "vocab_size": s.vocab,
            "rms_norm_eps": s.eps, "max_position_embeddings": 256, "tie_word_embeddings": s.tied,
            "rope_parameters": {"rope_theta": s.theta, "rope_type": "default"}, "dtype": "float32",
            "bos_token_id": 1, "eos_token_id": 2,
        });
        if let Some(w) = s.window {
            cfg["sliding_window"] = w.into();
        }
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        let tensors: HashMap<String, Tensor> = self
            .t
            .iter()
            .map(|(k, (shape, v))| (k.clone(), Tensor::from_vec(v.iter().map(|&x| x as f32).collect::<Vec<f32>>(), shape.as_slice(), &Device::Cpu).unwrap()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
        std::fs::copy(super::fixture("tokenizers/smollm2-135m.reference-tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    }

    fn w(&self, name: &str) -> &[f64] {
        &self.t.get(name).unwrap_or_else(|| panic!("no tensor {name}")).1
    }

    /// Reference logits `[seq][vocab]` for `ids`, with an optional LoRA delta per HF module path
    /// (`layers.{i}.self_attn.q_proj` → dense `[out][in]` added to the weight).
    pub fn reference_logits(&self, ids: &[u32], deltas: &HashMap<String, Vec<f64>>) -> Vec<Vec<f64>> {
        let s = &self.spec;
        let (h, hd, nh, nkv) = (s.hidden, s.head_dim(), s.heads, s.kv_heads);
        let n = ids.len();
        let emb = self.w("model.embed_tokens.weight");
        let mut x: Vec<Vec<f64>> = ids.iter().map(|&id| emb[id as usize * h..(id as usize + 1) * h].to_vec()).collect();
        let matvec = |name: &str, module: &str, v: &[f64]| -> Vec<f64> {
            let (shape, w) = &self.t[name];
            let (rows, cols) = (shape[0], shape[1]);
            let d = deltas.get(module);
            (0..rows).map(|r| (0..cols).map(|c| (w[r * cols + c] + d.map_or(0.0, |d| d[r * cols + c])) * v[c]).sum()).collect()
        };
        let rms = |v: &[f64], w: &[f64]| -> Vec<f64> {
            let ms = v.iter().map(|a| a * a).sum::<f64>() / v.len() as f64;
            let inv = 1.0 / (ms + s.eps).sqrt();
            v.iter().zip(w).map(|(a, g)| a * inv * g).collect()
        };
        // HF rotate-half RoPE: pairs (i, i + hd/2).
        let rope = |v: &mut [f64], pos: usize| {
            let half = hd / 2;
            for i in 0..half {
                let f = pos as f64 / s.theta.powf(2.0 * i as f64 / hd as f64);
                let (c, sn) = (f.cos(), f.sin());
                let (a, b) = (v[i], v[i + half]);
                v[i] = a * c - b * sn;
                v[i + half] = b * c + a * sn;
            }
        };
        for l in 0..s.layers {
            let p = format!("model.layers.{l}");
            let m = format!("layers.{l}");
            let normed: Vec<Vec<f64>> = x.iter().map(|v| rms(v, self.w(&format!("{p}.input_layernorm.weight")))).collect();
            let mut q: Vec<Vec<f64>> = normed.iter().map(|v| matvec(&format!("{p}.self_attn.q_proj.weight"), &format!("{m}.self_attn.q_proj"), v)).collect();
            let mut k: Vec<Vec<f64>> = normed.iter().map(|v| matvec(&format!("{p}.self_attn.k_proj.weight"), &format!("{m}.self_attn.k_proj"), v)).collect();
            let v: Vec<Vec<f64>> = normed.iter().map(|v| matvec(&format!("{p}.self_attn.v_proj.weight"), &format!("{m}.self_attn.v_proj"), v)).collect();
            for t in 0..n {
                for head in 0..nh {
                    rope(&mut q[t][head * hd..(head + 1) * hd], t);
                }
                for head in 0..nkv {
                    rope(&mut k[t][head * hd..(head + 1) * hd], t);
                }
            }
            let mut attn_out = vec![vec![0.0; h]; n];
            for t in 0..n {
                for head in 0..nh {
                    let kvh = head / (nh / nkv);
                    let visible: Vec<usize> = (0..=t).filter(|&j| s.window.is_none_or(|w| t - j < w)).collect();
                    let scores: Vec<f64> = visible.iter().map(|&j| (0..hd).map(|d| q[t][head * hd + d] * k[j][kvh * hd + d]).sum::<f64>() / (hd as f64).sqrt()).collect();
                    let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|sc| (sc - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (wi, &j) in visible.iter().enumerate() {
                        for d in 0..hd {
                            attn_out[t][head * hd + d] += e[wi] / z * v[j][kvh * hd + d];
                        }
                    }
                }
            }
            for t in 0..n {
                let o = matvec(&format!("{p}.self_attn.o_proj.weight"), &format!("{m}.self_attn.o_proj"), &attn_out[t]);
                for i in 0..h {
                    x[t][i] += o[i];
                }
                let hn = rms(&x[t], self.w(&format!("{p}.post_attention_layernorm.weight")));
                let g = matvec(&format!("{p}.mlp.gate_proj.weight"), &format!("{m}.mlp.gate_proj"), &hn);
                let u = matvec(&format!("{p}.mlp.up_proj.weight"), &format!("{m}.mlp.up_proj"), &hn);
                let act: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
                let d = matvec(&format!("{p}.mlp.down_proj.weight"), &format!("{m}.mlp.down_proj"), &act);
                for i in 0..h {
                    x[t][i] += d[i];
                }
            }
        }
        let head = if s.tied { "model.embed_tokens.weight" } else { "lm_head.weight" };
        x.iter().map(|v| matvec(head, "lm_head", &rms(v, self.w("model.norm.weight")))).collect()
    }
}

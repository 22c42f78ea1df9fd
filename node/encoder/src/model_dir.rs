//! A sentence-transformers model directory in the Hugging Face layout, read and checked
//! before any weight is loaded, so a broken install names the file at fault.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{EncoderError, Result};

/// `config.json` fields the BERT forward pass needs.
#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    /// MPNet (issue 21): buckets of its relative-position attention bias.
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    /// The padding token id; MPNet's position ids start past it.
    #[serde(default)]
    pub pad_token_id: usize,
}

impl BertConfig {
    /// An MPNet model (all-mpnet-base-v2): BERT's layers with a relative-position
    /// bias shared by every layer, RoBERTa-style position ids and no token types.
    pub fn is_mpnet(&self) -> bool {
        self.model_type.as_deref() == Some("mpnet")
    }
}

fn default_buckets() -> usize {
    32
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Deserialize)]
struct ModuleEntry {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: usize,
}

/// Everything read from a model dir except the weights.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    pub dir: PathBuf,
    pub bert: BertConfig,
    pub pooling: Pooling,
    pub normalize: bool,
    /// Tokens per text after truncation (`sentence_bert_config.json`), capped by the
    /// position table.
    pub max_seq_length: usize,
    pub weights: PathBuf,
    pub tokenizer: PathBuf,
}

fn read_json<T: serde::de::DeserializeOwned>(dir: &Path, file: &'static str) -> Result<T> {
    let path = dir.join(file);
    let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => EncoderError::MissingFile {
            dir: dir.to_owned(),
            file,
        },
        _ => EncoderError::BadFile {
            path: path.clone(),
            reason: e.to_string(),
        },
    })?;
    serde_json::from_slice(&bytes).map_err(|e| EncoderError::BadFile {
        path,
        reason: format!("invalid json: {e}"),
    })
}

fn require(dir: &Path, file: &'static str) -> Result<PathBuf> {
    let p = dir.join(file);
    if p.is_file() {
        Ok(p)
    } else {
        Err(EncoderError::MissingFile {
            dir: dir.to_owned(),
            file,
        })
    }
}

impl ModelSpec {
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(EncoderError::BadFile {
                path: dir.to_owned(),
                reason: "not a directory (run scripts/fetch-model.sh, or pass --model-dir)".into(),
            });
        }
        let bert: BertConfig = read_json(dir, "config.json")?;
        if bert
            .model_type
            .as_deref()
            .is_some_and(|t| t != "bert" && t != "mpnet")
        {
            return Err(EncoderError::Unsupported(format!(
                "model_type {:?}, only bert and mpnet are supported",
                bert.model_type
            )));
        }
        if bert
            .position_embedding_type
            .as_deref()
            .is_some_and(|t| t != "absolute")
        {
            return Err(EncoderError::Unsupported(format!(
                "position_embedding_type {:?}",
                bert.position_embedding_type
            )));
        }
        if bert.hidden_act != "gelu" {
            return Err(EncoderError::Unsupported(format!(
                "hidden_act {}",
                bert.hidden_act
            )));
        }
        if bert.num_attention_heads == 0
            || !bert.hidden_size.is_multiple_of(bert.num_attention_heads)
        {
            return Err(EncoderError::BadFile {
                path: dir.join("config.json"),
                reason: "hidden_size is not a multiple of num_attention_heads".into(),
            });
        }
        let modules: Vec<ModuleEntry> = read_json(dir, "modules.json")?;
        let pooling_dir = modules
            .iter()
            .find(|m| m.kind.ends_with("models.Pooling"))
            .map(|m| m.path.clone())
            .ok_or_else(|| EncoderError::BadFile {
                path: dir.join("modules.json"),
                reason: "no Pooling module listed".into(),
            })?;
        let normalize = modules.iter().any(|m| m.kind.ends_with("models.Normalize"));
        let pool_file: &'static str = if pooling_dir == "1_Pooling" {
            "1_Pooling/config.json"
        } else {
            return Err(EncoderError::Unsupported(format!(
                "pooling module at {pooling_dir:?}"
            )));
        };
        let p: PoolingConfig = read_json(dir, pool_file)?;
        let pooling = match (p.pooling_mode_mean_tokens, p.pooling_mode_cls_token) {
            _ if p.pooling_mode_max_tokens || p.pooling_mode_mean_sqrt_len_tokens => {
                return Err(EncoderError::Unsupported(
                    "max or mean-sqrt-len pooling".into(),
                ))
            }
            (true, false) => Pooling::Mean,
            (false, true) => Pooling::Cls,
            _ => {
                return Err(EncoderError::BadFile {
                    path: dir.join(pool_file),
                    reason: "exactly one of mean or cls pooling must be set".into(),
                })
            }
        };
        let sbert: SentenceBertConfig = read_json(dir, "sentence_bert_config.json")?;
        Ok(Self {
            dir: dir.to_owned(),
            max_seq_length: sbert.max_seq_length.min(bert.max_position_embeddings),
            bert,
            pooling,
            normalize,
            weights: require(dir, "model.safetensors")?,
            tokenizer: require(dir, "tokenizer.json")?,
        })
    }

    pub fn dimension(&self) -> usize {
        self.bert.hidden_size
    }
}

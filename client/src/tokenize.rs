//! Word-piece tokenization with the `tokenizers` crate, as transformers' fast tokenizer does it.
//!
//! A model folder's `tokenizer.json` is used when present; otherwise a BERT word-piece
//! tokenizer is built from `vocab.txt` (lower-casing as `tokenizer_config.json` says, default
//! on). Padding and truncation baked into `tokenizer.json` are overridden (MiniLM's pads every
//! input to 128): sequences are truncated to `max_len` tokens including `[CLS]`/`[SEP]` and a
//! batch is padded to its longest member, which is what makes short-text training fast.

use std::path::Path;

use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, Tokenizer, TruncationParams, TruncationStrategy};

/// Errors from loading a tokenizer or encoding text.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// Neither `tokenizer.json` nor `vocab.txt` is in the folder.
    #[error("{0}: neither tokenizer.json nor vocab.txt found")]
    NotFound(String),
    /// A tokenizer file could not be loaded.
    #[error("{path}: {reason}")]
    Load {
        /// File involved.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The tokenizer lacks a token BERT needs.
    #[error("the tokenizer has no `{0}` token")]
    MissingToken(String),
    /// `max_len` cannot hold `[CLS]` and `[SEP]`.
    #[error("max_len must be at least 2, got {0}")]
    MaxLen(usize),
    /// Encoding failed.
    #[error("could not tokenize text: {0}")]
    Encode(String),
}

/// One text's tokens, without padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids, `[CLS] … [SEP]`, at most `max_len` long.
    pub ids: Vec<i64>,
    /// Segment ids (all 0 for a single text).
    pub type_ids: Vec<i64>,
}

/// A batch padded to its longest member, row-major `[batch, seq]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedBatch {
    /// Rows in the batch.
    pub batch_size: usize,
    /// Columns (longest sequence in the batch).
    pub seq_len: usize,
    /// Token ids, pad id after each sequence's end.
    pub input_ids: Vec<i64>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<i64>,
    /// Segment ids, 0 for padding.
    pub token_type_ids: Vec<i64>,
}

impl EncodedBatch {
    /// Pads `items` to the longest of them with `pad_id`.
    pub fn collate(items: &[&Encoded], pad_id: i64) -> Self {
        let seq_len = items.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let n = items.len() * seq_len;
        let (mut input_ids, mut attention_mask, mut token_type_ids) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for e in items {
            let pad = seq_len - e.ids.len();
            input_ids.extend(e.ids.iter().copied().chain(std::iter::repeat_n(pad_id, pad)));
            attention_mask.extend(std::iter::repeat_n(1, e.ids.len()).chain(std::iter::repeat_n(0, pad)));
            token_type_ids.extend(e.type_ids.iter().copied().chain(std::iter::repeat_n(0, pad)));
        }
        Self { batch_size: items.len(), seq_len, input_ids, attention_mask, token_type_ids }
    }
}

/// A BERT tokenizer with fedtune's truncation and padding policy.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pad_id: i64,
    max_len: usize,
}

impl TextTokenizer {
    /// From a model folder: `tokenizer.json`, else `vocab.txt`.
    pub fn from_model_dir(dir: &Path, max_len: usize) -> Result<Self, TokenizeError> {
        let json = dir.join("tokenizer.json");
        let vocab = dir.join("vocab.txt");
        if json.is_file() {
            Self::from_tokenizer_json(&json, max_len)
        } else if vocab.is_file() {
            Self::from_vocab(&vocab, lowercase_from_config(dir), max_len)
        } else {
            Err(TokenizeError::NotFound(dir.display().to_string()))
        }
    }

    /// From a `tokenizer.json`, ignoring the padding and truncation it carries.
    pub fn from_tokenizer_json(path: &Path, max_len: usize) -> Result<Self, TokenizeError> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| TokenizeError::Load { path: path.display().to_string(), reason: e.to_string() })?;
        Self::with_policy(inner, max_len)
    }

    /// A BERT word-piece tokenizer (normalizer, pre-tokenizer, `[CLS] $A [SEP]`) from a
    /// `vocab.txt`, as transformers' `BertTokenizer` builds it.
    pub fn from_vocab(path: &Path, lowercase: bool, max_len: usize) -> Result<Self, TokenizeError> {
        let shown = path.display().to_string();
        let wordpiece = WordPiece::from_file(&path.to_string_lossy())
            .unk_token("[UNK]".into())
            .build()
            .map_err(|e| TokenizeError::Load { path: shown.clone(), reason: e.to_string() })?;
        let mut inner = Tokenizer::new(wordpiece);
        let id = |t: &str| inner.token_to_id(t).ok_or_else(|| TokenizeError::MissingToken(t.into()));
        let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
        inner
            .with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)))
            .with_pre_tokenizer(Some(BertPreTokenizer))
            .with_post_processor(Some(BertProcessing::new(("[SEP]".into(), sep), ("[CLS]".into(), cls))))
            .with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
        // As in transformers, special tokens written in the text ("[UNK]", "[SEP]") stay whole.
        let specials: Vec<AddedToken> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            .into_iter()
            .filter(|t| inner.token_to_id(t).is_some())
            .map(|t| AddedToken::from(t, true))
            .collect();
        inner.add_special_tokens(&specials);
        Self::with_policy(inner, max_len)
    }

    fn with_policy(mut inner: Tokenizer, max_len: usize) -> Result<Self, TokenizeError> {
        if max_len < 2 {
            return Err(TokenizeError::MaxLen(max_len));
        }
        let pad_token = inner.get_padding().map(|p| p.pad_token.clone()).unwrap_or_else(|| "[PAD]".into());
        let pad_id = inner.token_to_id(&pad_token).ok_or(TokenizeError::MissingToken(pad_token))?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                ..TruncationParams::default()
            }))
            .map_err(|e| TokenizeError::Encode(e.to_string()))?;
        Ok(Self { inner, pad_id: i64::from(pad_id), max_len })
    }

    /// The padding token's id.
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// The longest sequence produced, special tokens included.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Size of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Tokenizes one text (`[CLS] … [SEP]`, truncated, unpadded).
    pub fn encode(&self, text: &str) -> Result<Encoded, TokenizeError> {
        let e = self.inner.encode(text, true).map_err(|e| TokenizeError::Encode(e.to_string()))?;
        Ok(Encoded {
            ids: e.get_ids().iter().map(|&i| i64::from(i)).collect(),
            type_ids: e.get_type_ids().iter().map(|&i| i64::from(i)).collect(),
        })
    }

    /// Tokenizes many texts (in parallel where the crate allows), unpadded.
    pub fn encode_all(&self, texts: &[&str]) -> Result<Vec<Encoded>, TokenizeError> {
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| TokenizeError::Encode(e.to_string()))?;
        Ok(encodings
            .iter()
            .map(|e| Encoded {
                ids: e.get_ids().iter().map(|&i| i64::from(i)).collect(),
                type_ids: e.get_type_ids().iter().map(|&i| i64::from(i)).collect(),
            })
            .collect())
    }

    /// Tokenizes texts into one batch padded to its longest member.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<EncodedBatch, TokenizeError> {
        let items = self.encode_all(texts)?;
        Ok(EncodedBatch::collate(&items.iter().collect::<Vec<_>>(), self.pad_id))
    }
}

/// `do_lower_case` from `tokenizer_config.json` (transformers' default: true).
fn lowercase_from_config(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("do_lower_case").and_then(serde_json::Value::as_bool))
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collating_pads_to_the_longest_member() {
        let a = Encoded { ids: vec![1, 5, 2], type_ids: vec![0, 0, 0] };
        let b = Encoded { ids: vec![1, 2], type_ids: vec![0, 0] };
        let batch = EncodedBatch::collate(&[&a, &b], 9);
        assert_eq!((batch.batch_size, batch.seq_len), (2, 3));
        assert_eq!(batch.input_ids, vec![1, 5, 2, 1, 2, 9]);
        assert_eq!(batch.attention_mask, vec![1, 1, 1, 1, 1, 0]);
    }
}

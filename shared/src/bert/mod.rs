//! BERT sequence classifiers as both binaries see them: what a tensor name says about its place
//! in the model, which tensors a federation trains, and the Hugging Face directory a model is
//! exported as. No libtorch: names and `f32` buffers only.
//!
//! # Names
//! Tensors carry the names transformers' `BertForSequenceClassification` uses: `bert.embeddings.…`,
//! `bert.encoder.layer.{i}.…`, `bert.pooler.…` and `classifier.…` ([`TensorRole::of`]). A
//! checkpoint of a bare `BertModel` (no `bert.` prefix), with pre-training heads or with
//! TensorFlow-era `LayerNorm.gamma/beta` names, maps onto them with [`checkpoint_name`].
//!
//! # Train scope
//! A federation trains the classifier and the pooler always, and either every encoder layer or
//! only the top `k` ([`TrainScope`]). Embeddings train only when every layer does and they are
//! not frozen: training the embeddings under a frozen middle of the encoder is never what
//! "top k layers plus head" means. A tensor whose name this module does not know is **frozen**:
//! the coordinator cannot aggregate what a client might not upload, and a client must never
//! change what the federation does not average. The coordinator applies the scope to its
//! checkpoint to build the trainable manifest; a client recovers the scope from that manifest
//! ([`TrainScope::of_trainable`]) and applies it to its own model, so both select the same
//! tensors by construction.
//!
//! # Adapters
//! With a LoRA adapter ([`lora::LoraConfig`]) the rule is [`lora::LoraConfig::trains`]
//! instead: the `lora_B` tensors and the head, nothing else.
//!
//! - [`export`]: writing a model directory transformers' `from_pretrained` loads, and an
//!   adapter directory `peft` loads.
//! - [`lora`]: LoRA naming, the seeded A, merging, and why only B trains.

pub mod export;
pub mod initial;
pub mod lora;

/// Where a tensor sits in a `BertForSequenceClassification`, read from its transformers name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// `bert.embeddings.…`: word, position and token-type embeddings and their LayerNorm.
    Embeddings,
    /// `bert.encoder.layer.{i}.…`: encoder layer `i` (0 is closest to the embeddings).
    EncoderLayer(usize),
    /// `bert.pooler.…`: the dense layer over `[CLS]` that feeds the classifier.
    Pooler,
    /// `classifier.…`: the classification head.
    Classifier,
    /// Any other name (including a malformed layer index): never trained (see the module docs).
    Unknown,
}

impl TensorRole {
    /// The role of the tensor named `name` (transformers' naming, `bert.` prefix included).
    pub fn of(name: &str) -> Self {
        if name.starts_with("classifier.") {
            return Self::Classifier;
        }
        let Some(rest) = name.strip_prefix("bert.") else {
            return Self::Unknown;
        };
        if rest.starts_with("embeddings.") {
            Self::Embeddings
        } else if rest.starts_with("pooler.") {
            Self::Pooler
        } else if let Some(layer) = rest.strip_prefix("encoder.layer.") {
            match layer.split_once('.').map(|(i, _)| i.parse::<usize>()) {
                Some(Ok(i)) => Self::EncoderLayer(i),
                _ => Self::Unknown,
            }
        } else {
            Self::Unknown
        }
    }
}

/// Number of encoder layers a set of tensor names describes (highest layer index + 1; 0 when
/// none is an encoder layer).
pub fn num_encoder_layers<'a>(names: impl IntoIterator<Item = &'a str>) -> usize {
    names
        .into_iter()
        .filter_map(|n| match TensorRole::of(n) {
            TensorRole::EncoderLayer(i) => Some(i + 1),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// Which tensors of a BERT classifier are trained; the rest keep their loaded values and never
/// travel (see the module docs for the rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrainScope {
    /// Train only the top `k` encoder layers plus pooler and classifier (`Some(0)`: the head
    /// only). Implies frozen embeddings. `None` trains every layer.
    pub train_top_layers: Option<usize>,
    /// Keep the embedding block frozen.
    pub freeze_embeddings: bool,
}

impl TrainScope {
    /// Whether the tensor `name` (transformers' naming) is trained in a model of `num_layers`
    /// encoder layers.
    pub fn trains(&self, name: &str, num_layers: usize) -> bool {
        match TensorRole::of(name) {
            TensorRole::Classifier | TensorRole::Pooler => true,
            TensorRole::Embeddings => !self.freeze_embeddings && self.train_top_layers.is_none(),
            TensorRole::EncoderLayer(i) => {
                self.train_top_layers.is_none_or(|k| i >= num_layers.saturating_sub(k))
            }
            TensorRole::Unknown => false,
        }
    }

    /// [`Self::trains`] as a predicate over names, for a model of `num_layers` encoder layers.
    pub fn rule(self, num_layers: usize) -> impl Fn(&str) -> bool + Clone {
        move |name: &str| self.trains(name, num_layers)
    }

    /// The scope that trains exactly the tensors named in `trainable` (a coordinator's
    /// trainable manifest) in a model of `num_layers` encoder layers, so that a client needs no
    /// setting of its own that could disagree with the coordinator's.
    pub fn of_trainable<'a>(trainable: impl IntoIterator<Item = &'a str>, num_layers: usize) -> Self {
        let mut lowest_layer = None::<usize>;
        for name in trainable {
            match TensorRole::of(name) {
                TensorRole::Embeddings => return Self { train_top_layers: None, freeze_embeddings: false },
                TensorRole::EncoderLayer(i) => lowest_layer = Some(lowest_layer.map_or(i, |l| l.min(i))),
                _ => {}
            }
        }
        Self {
            train_top_layers: Some(lowest_layer.map_or(0, |l| num_layers.saturating_sub(l))),
            freeze_embeddings: true,
        }
    }
}

/// Whether a checkpoint tensor is one of the buffers transformers saves next to the parameters
/// (`embeddings.position_ids`, `embeddings.token_type_ids`): not a weight, never loaded.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("embeddings.position_ids") || name.ends_with("embeddings.token_type_ids")
}

/// Maps a tensor name found in a Hugging Face checkpoint to the classifier's name, or `None`
/// for a tensor the classifier does not have: buffers (`position_ids`, `token_type_ids`) and
/// pre-training heads (`cls.…`). A bare `BertModel`'s names get the `bert.` prefix; old
/// `LayerNorm.gamma/beta` become `weight/bias`.
pub fn checkpoint_name(name: &str) -> Option<String> {
    if is_buffer(name) || name.starts_with("cls.") {
        return None;
    }
    let mut n = if name.starts_with("bert.") || name.starts_with("classifier.") {
        name.to_string()
    } else {
        format!("bert.{name}")
    };
    if n.contains("LayerNorm.") {
        if let Some(stem) = n.strip_suffix(".gamma") {
            n = format!("{stem}.weight");
        } else if let Some(stem) = n.strip_suffix(".beta") {
            n = format!("{stem}.bias");
        }
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOP2: [&str; 4] = [
        "bert.encoder.layer.4.output.dense.weight",
        "bert.encoder.layer.5.output.dense.weight",
        "bert.pooler.dense.weight",
        "classifier.weight",
    ];

    #[test]
    fn names_map_to_their_place_in_the_model() {
        assert_eq!(TensorRole::of("bert.embeddings.word_embeddings.weight"), TensorRole::Embeddings);
        assert_eq!(
            TensorRole::of("bert.encoder.layer.11.attention.self.query.bias"),
            TensorRole::EncoderLayer(11)
        );
        assert_eq!(TensorRole::of("bert.pooler.dense.weight"), TensorRole::Pooler);
        assert_eq!(TensorRole::of("classifier.bias"), TensorRole::Classifier);
        for unknown in [
            "bert.encoder.layer.x.output.dense.weight",
            "bert.encoder.layer.3",
            "encoder.layer.0.output.dense.weight",
            "cls.predictions.bias",
            "bert.extra.weight",
            "",
        ] {
            assert_eq!(TensorRole::of(unknown), TensorRole::Unknown, "{unknown}");
        }
    }

    #[test]
    fn the_layer_count_is_the_highest_index_plus_one() {
        assert_eq!(num_encoder_layers(TOP2), 6);
        assert_eq!(num_encoder_layers(["classifier.weight"]), 0);
    }

    #[test]
    fn the_top_k_scope_trains_those_layers_and_the_head_and_freezes_the_embeddings() {
        let scope = TrainScope { train_top_layers: Some(1), freeze_embeddings: false };
        assert!(!scope.trains("bert.embeddings.word_embeddings.weight", 6));
        assert!(!scope.trains("bert.encoder.layer.4.output.dense.weight", 6));
        assert!(scope.trains("bert.encoder.layer.5.output.dense.weight", 6));
        assert!(scope.trains("bert.pooler.dense.weight", 6));
        assert!(scope.trains("classifier.bias", 6));
        let head_only = TrainScope { train_top_layers: Some(0), freeze_embeddings: true };
        assert!(!head_only.trains("bert.encoder.layer.5.output.dense.weight", 6));
        assert!(head_only.trains("classifier.weight", 6));
    }

    #[test]
    fn the_full_scope_trains_everything_known_but_frozen_embeddings() {
        assert!(TrainScope::default().trains("bert.embeddings.LayerNorm.weight", 2));
        assert!(TrainScope::default().trains("bert.encoder.layer.0.intermediate.dense.weight", 2));
        let frozen = TrainScope { freeze_embeddings: true, ..TrainScope::default() };
        assert!(!frozen.trains("bert.embeddings.LayerNorm.weight", 2));
        assert!(frozen.trains("bert.encoder.layer.0.intermediate.dense.weight", 2));
    }

    #[test]
    fn tensors_with_unknown_names_are_never_trained() {
        for scope in
            [TrainScope::default(), TrainScope { train_top_layers: Some(2), freeze_embeddings: true }]
        {
            for name in ["bert.extra.weight", "bert.encoder.layer.x.weight", "lm_head.bias"] {
                assert!(!scope.trains(name, 6), "{scope:?} must freeze {name}");
            }
        }
    }

    #[test]
    fn the_scope_is_recovered_from_the_trainable_tensors_it_selects() {
        let top2 = TrainScope::of_trainable(TOP2, 6);
        assert_eq!(top2, TrainScope { train_top_layers: Some(2), freeze_embeddings: true });
        let head = TrainScope::of_trainable(["classifier.weight", "classifier.bias"], 6);
        assert_eq!(head.train_top_layers, Some(0));
        let all = TrainScope::of_trainable(
            ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.x", "classifier.bias"],
            6,
        );
        assert_eq!(all, TrainScope { train_top_layers: None, freeze_embeddings: false });

        // Round trip: the recovered scope selects exactly what the original selected.
        let mut model: Vec<String> = vec!["bert.embeddings.word_embeddings.weight".into()];
        model.extend((0..6).map(|i| format!("bert.encoder.layer.{i}.output.dense.weight")));
        model.extend(["bert.pooler.dense.weight".into(), "classifier.weight".into(), "bert.extra".into()]);
        for original in [
            TrainScope::default(),
            TrainScope { train_top_layers: None, freeze_embeddings: true },
            TrainScope { train_top_layers: Some(2), freeze_embeddings: false },
            TrainScope { train_top_layers: Some(0), freeze_embeddings: true },
        ] {
            let selected: Vec<&str> =
                model.iter().map(String::as_str).filter(|n| original.trains(n, 6)).collect();
            let recovered = TrainScope::of_trainable(selected.iter().copied(), 6);
            let again: Vec<&str> =
                model.iter().map(String::as_str).filter(|n| recovered.trains(n, 6)).collect();
            assert_eq!(again, selected, "{original:?} recovered as {recovered:?}");
        }
    }

    #[test]
    fn checkpoint_names_become_classifier_names() {
        assert_eq!(
            checkpoint_name("encoder.layer.0.output.dense.weight").unwrap(),
            "bert.encoder.layer.0.output.dense.weight"
        );
        assert_eq!(checkpoint_name("bert.pooler.dense.bias").unwrap(), "bert.pooler.dense.bias");
        assert_eq!(checkpoint_name("classifier.weight").unwrap(), "classifier.weight");
        assert_eq!(
            checkpoint_name("embeddings.LayerNorm.gamma").unwrap(),
            "bert.embeddings.LayerNorm.weight"
        );
        assert_eq!(
            checkpoint_name("bert.embeddings.LayerNorm.beta").unwrap(),
            "bert.embeddings.LayerNorm.bias"
        );
        for skipped in ["embeddings.position_ids", "bert.embeddings.token_type_ids", "cls.predictions.bias"] {
            assert_eq!(checkpoint_name(skipped), None, "{skipped}");
        }
    }
}

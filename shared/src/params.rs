//! Parameter vectors: the one format in which model weights and updates travel.
//!
//! The trainer (tch) and the aggregator (plain Rust) never share framework types; they exchange
//! a [`ParameterVector`]: one contiguous `f32` buffer laid out tensor after tensor in the order of
//! its [`Manifest`]. A contiguous buffer is what streaming aggregation, clipping, noising and
//! chunked transfer all want, and its digest is cheap to compute and check.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ring::digest;
use serde::{Deserialize, Serialize};

/// Errors from building, checking or (de)serializing parameter vectors.
#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    /// The buffer length does not equal the number of elements the manifest describes.
    #[error("parameter buffer has {actual} values but the manifest describes {expected}")]
    LengthMismatch {
        /// Elements the manifest describes.
        expected: usize,
        /// Elements the buffer holds.
        actual: usize,
    },
    /// Two manifests that must agree do not.
    #[error("manifest mismatch: {0}")]
    ManifestMismatch(String),
    /// A tensor name appears twice in one manifest.
    #[error("tensor `{0}` appears twice in the manifest")]
    DuplicateTensor(String),
    /// A value is NaN or infinite.
    #[error("tensor `{tensor}` holds a non-finite value at flat index {index}")]
    NonFinite {
        /// Tensor holding the value.
        tensor: String,
        /// Index within the whole vector.
        index: usize,
    },
    /// A safetensors file could not be read or written.
    #[error("safetensors file {path}: {reason}")]
    Safetensors {
        /// File involved.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A tensor in a safetensors file has a dtype we do not convert.
    #[error("tensor `{tensor}` in {path} has dtype {dtype}; only F32, F16 and BF16 are supported")]
    UnsupportedDtype {
        /// File involved.
        path: String,
        /// Tensor name.
        tensor: String,
        /// Its dtype as safetensors names it.
        dtype: String,
    },
    /// Filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// File involved.
        path: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// One named tensor's place in a parameter vector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// The checkpoint name, e.g. `bert.encoder.layer.0.attention.self.query.weight`.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The ordered list of tensors a [`ParameterVector`] holds. All values are `f32`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Manifest {
    /// Tensors in buffer order.
    pub tensors: Vec<TensorSpec>,
}

impl Manifest {
    /// Builds a manifest, refusing duplicate names.
    pub fn new(tensors: Vec<TensorSpec>) -> Result<Self, ParamsError> {
        let mut seen = std::collections::HashSet::new();
        for t in &tensors {
            if !seen.insert(t.name.as_str()) {
                return Err(ParamsError::DuplicateTensor(t.name.clone()));
            }
        }
        Ok(Self { tensors })
    }

    /// Total number of `f32` values.
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(TensorSpec::numel).sum()
    }

    /// Byte length of the vector's payload (little-endian `f32`).
    pub fn byte_len(&self) -> usize {
        self.numel() * 4
    }

    /// `(spec, start..end)` for every tensor, in buffer order.
    pub fn ranges(&self) -> impl Iterator<Item = (&TensorSpec, std::ops::Range<usize>)> + '_ {
        let mut offset = 0;
        self.tensors.iter().map(move |t| {
            let start = offset;
            offset += t.numel();
            (t, start..offset)
        })
    }

    /// SHA-256 over a canonical encoding of names and shapes. Two sides that agree on this
    /// digest agree on how to read each other's buffers.
    pub fn digest(&self) -> [u8; 32] {
        let mut ctx = digest::Context::new(&digest::SHA256);
        for t in &self.tensors {
            ctx.update(&(t.name.len() as u64).to_le_bytes());
            ctx.update(t.name.as_bytes());
            ctx.update(&(t.shape.len() as u64).to_le_bytes());
            for d in &t.shape {
                ctx.update(&(*d as u64).to_le_bytes());
            }
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    /// The manifest restricted to `names` (kept in this manifest's order).
    pub fn subset(&self, keep: impl Fn(&str) -> bool) -> Manifest {
        Manifest { tensors: self.tensors.iter().filter(|t| keep(&t.name)).cloned().collect() }
    }

    /// Errors unless `other` describes exactly the same tensors in the same order.
    pub fn ensure_same(&self, other: &Manifest) -> Result<(), ParamsError> {
        if self == other {
            return Ok(());
        }
        if self.tensors.len() != other.tensors.len() {
            return Err(ParamsError::ManifestMismatch(format!(
                "expected {} tensors, got {}",
                self.tensors.len(),
                other.tensors.len()
            )));
        }
        for (a, b) in self.tensors.iter().zip(&other.tensors) {
            if a != b {
                return Err(ParamsError::ManifestMismatch(format!(
                    "expected `{}` {:?}, got `{}` {:?}",
                    a.name, a.shape, b.name, b.shape
                )));
            }
        }
        Err(ParamsError::ManifestMismatch("manifests differ".into()))
    }
}

/// Model weights or an update: a manifest plus one contiguous `f32` buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct ParameterVector {
    manifest: Manifest,
    values: Vec<f32>,
}

impl ParameterVector {
    /// Pairs a manifest with a buffer of matching length.
    pub fn new(manifest: Manifest, values: Vec<f32>) -> Result<Self, ParamsError> {
        if manifest.numel() != values.len() {
            return Err(ParamsError::LengthMismatch { expected: manifest.numel(), actual: values.len() });
        }
        Ok(Self { manifest, values })
    }

    /// All zeros with the given manifest.
    pub fn zeros(manifest: Manifest) -> Self {
        let n = manifest.numel();
        Self { manifest, values: vec![0.0; n] }
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The flat values.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// The flat values, mutable.
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// Splits into manifest and buffer.
    pub fn into_parts(self) -> (Manifest, Vec<f32>) {
        (self.manifest, self.values)
    }

    /// The values of one tensor.
    pub fn tensor(&self, name: &str) -> Option<&[f32]> {
        self.manifest.ranges().find(|(t, _)| t.name == name).map(|(_, r)| &self.values[r])
    }

    /// Errors on the first NaN or infinity, naming its tensor.
    pub fn ensure_finite(&self) -> Result<(), ParamsError> {
        for (spec, range) in self.manifest.ranges() {
            if let Some(i) = self.values[range.clone()].iter().position(|v| !v.is_finite()) {
                return Err(ParamsError::NonFinite { tensor: spec.name.clone(), index: range.start + i });
            }
        }
        Ok(())
    }

    /// L2 norm over all values, accumulated in f64 so that 10⁸ values keep their precision.
    pub fn l2_norm(&self) -> f64 {
        self.values.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt()
    }

    /// SHA-256 of the payload bytes (little-endian `f32`), the digest the wire protocol checks.
    pub fn payload_digest(&self) -> [u8; 32] {
        let mut ctx = digest::Context::new(&digest::SHA256);
        for chunk in self.values.chunks(1 << 16) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            ctx.update(&bytes);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    /// Payload as little-endian bytes.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.values.len() * 4);
        for v in &self.values {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Builds a vector from little-endian bytes.
    pub fn from_le_bytes(manifest: Manifest, bytes: &[u8]) -> Result<Self, ParamsError> {
        if bytes.len() != manifest.byte_len() {
            return Err(ParamsError::LengthMismatch { expected: manifest.numel(), actual: bytes.len() / 4 });
        }
        let values = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        Self::new(manifest, values)
    }

    /// The tensors named by `manifest` (a subset of ours, any order), in `manifest`'s order.
    pub fn select(&self, manifest: &Manifest) -> Result<ParameterVector, ParamsError> {
        let index: BTreeMap<&str, (&TensorSpec, std::ops::Range<usize>)> =
            self.manifest.ranges().map(|(t, r)| (t.name.as_str(), (t, r))).collect();
        let mut values = Vec::with_capacity(manifest.numel());
        for want in &manifest.tensors {
            let (have, range) = index
                .get(want.name.as_str())
                .ok_or_else(|| ParamsError::ManifestMismatch(format!("tensor `{}` is missing", want.name)))?;
            if have.shape != want.shape {
                return Err(ParamsError::ManifestMismatch(format!(
                    "tensor `{}` has shape {:?}, expected {:?}",
                    want.name, have.shape, want.shape
                )));
            }
            values.extend_from_slice(&self.values[range.clone()]);
        }
        ParameterVector::new(manifest.clone(), values)
    }

    /// Writes the vector as a safetensors file (F32, names from the manifest), atomically
    /// ([`crate::files::atomic_write`]).
    pub fn save_safetensors(&self, path: &Path) -> Result<(), ParamsError> {
        let data = self
            .to_safetensors(None)
            .map_err(|reason| ParamsError::Safetensors { path: path.display().to_string(), reason })?;
        crate::files::atomic_write(path, &data)
            .map_err(|e| ParamsError::Io { path: e.path.display().to_string(), source: e.source })
    }

    /// The vector as safetensors bytes (F32, names and order from the manifest), with the
    /// header's `__metadata__` set to `metadata` (transformers writes `format: pt`).
    pub fn to_safetensors(&self, metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>, String> {
        let bytes = self.to_le_bytes();
        let mut views = Vec::with_capacity(self.manifest.tensors.len());
        for (spec, range) in self.manifest.ranges() {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                spec.shape.clone(),
                &bytes[range.start * 4..range.end * 4],
            )
            .map_err(|e| e.to_string())?;
            views.push((spec.name.clone(), view));
        }
        safetensors::serialize(views, metadata).map_err(|e| e.to_string())
    }

    /// Reads every floating-point tensor of a safetensors file, converted to f32, in
    /// [`natural_cmp`] order of their names, optionally keeping only names `keep` accepts.
    pub fn load_safetensors(path: &Path, keep: impl Fn(&str) -> bool) -> Result<Self, ParamsError> {
        let io = |source| ParamsError::Io { path: path.display().to_string(), source };
        let data = std::fs::read(path).map_err(io)?;
        let st = safetensors::SafeTensors::deserialize(&data).map_err(|e| ParamsError::Safetensors {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut names: Vec<String> = st.names().into_iter().filter(|n| keep(n)).map(String::from).collect();
        names.sort_by(|a, b| natural_cmp(a, b));
        let mut tensors = Vec::with_capacity(names.len());
        let mut values = Vec::new();
        for name in names {
            let view = st.tensor(&name).map_err(|e| ParamsError::Safetensors {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            let raw = view.data();
            match view.dtype() {
                safetensors::Dtype::F32 => {
                    values.extend(raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                }
                safetensors::Dtype::BF16 => values.extend(
                    raw.chunks_exact(2)
                        .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)),
                ),
                safetensors::Dtype::F16 => {
                    values.extend(raw.chunks_exact(2).map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))))
                }
                other => {
                    return Err(ParamsError::UnsupportedDtype {
                        path: path.display().to_string(),
                        tensor: name,
                        dtype: format!("{other:?}"),
                    })
                }
            }
            tensors.push(TensorSpec { name, shape: view.shape().to_vec() });
        }
        ParameterVector::new(Manifest::new(tensors)?, values)
    }
}

/// IEEE half → single, exact (every f16 is representable as f32).
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let frac = u32::from(h & 0x3ff);
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: value = frac · 2⁻²⁴.
            let v = frac as f32 * f32::from_bits(0x3380_0000);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, _) => sign | 0x7fc0_0000,
        _ => sign | ((exp + 112) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

/// The order of tensors in manifests, checkpoints and exports on both sides: names compare
/// segment by segment (split at `.`), numeric segments as numbers, so `layer.2` sorts before
/// `layer.10`. The coordinator's trainable manifest and a client's must list the same tensors
/// in the same order, so this is the only order either side sorts by.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let mut xs = a.split('.');
    let mut ys = b.split('.');
    loop {
        match (xs.next(), ys.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let o = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(i), Ok(j)) => i.cmp(&j),
                    _ => x.cmp(y),
                };
                if o != Ordering::Equal {
                    return o;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest::new(vec![
            TensorSpec { name: "a.weight".into(), shape: vec![2, 3] },
            TensorSpec { name: "a.bias".into(), shape: vec![3] },
        ])
        .unwrap()
    }

    #[test]
    fn layer_numbers_sort_as_numbers() {
        let mut names =
            vec!["bert.encoder.layer.10.x", "classifier.bias", "bert.encoder.layer.2.x", "bert.embeddings.a"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            ["bert.embeddings.a", "bert.encoder.layer.2.x", "bert.encoder.layer.10.x", "classifier.bias"]
        );
    }

    #[test]
    fn a_safetensors_file_loads_in_natural_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let names = ["layer.10.w", "layer.9.w", "layer.1.w"];
        let m =
            Manifest::new(names.iter().map(|n| TensorSpec { name: (*n).into(), shape: vec![1] }).collect())
                .unwrap();
        ParameterVector::new(m, vec![10.0, 9.0, 1.0]).unwrap().save_safetensors(&path).unwrap();
        let back = ParameterVector::load_safetensors(&path, |_| true).unwrap();
        let order: Vec<&str> = back.manifest().tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(order, ["layer.1.w", "layer.9.w", "layer.10.w"]);
        assert_eq!(back.values(), &[1.0, 9.0, 10.0]);
    }

    #[test]
    fn a_buffer_must_match_its_manifest_length() {
        assert!(ParameterVector::new(manifest(), vec![0.0; 8]).is_err());
        assert!(ParameterVector::new(manifest(), vec![0.0; 9]).is_ok());
    }

    #[test]
    fn duplicate_tensor_names_are_refused() {
        let t = TensorSpec { name: "x".into(), shape: vec![1] };
        assert!(matches!(Manifest::new(vec![t.clone(), t]), Err(ParamsError::DuplicateTensor(_))));
    }

    #[test]
    fn non_finite_values_are_reported_with_their_tensor() {
        let mut v = ParameterVector::zeros(manifest());
        v.values_mut()[7] = f32::NAN;
        let err = v.ensure_finite().unwrap_err().to_string();
        assert!(err.contains("a.bias") && err.contains('7'), "{err}");
    }

    #[test]
    fn safetensors_round_trip_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let v = ParameterVector::new(manifest(), (0..9).map(|i| i as f32 * 0.25 - 1.0).collect()).unwrap();
        v.save_safetensors(&path).unwrap();
        let back = ParameterVector::load_safetensors(&path, |_| true).unwrap();
        // Loading sorts by name, so compare through `select` in the original order.
        assert_eq!(back.select(v.manifest()).unwrap(), v);
    }

    #[test]
    fn manifest_digest_depends_on_names_and_shapes() {
        let a = manifest();
        let mut b = manifest();
        b.tensors[1].shape = vec![1, 3];
        assert_ne!(a.digest(), b.digest());
        assert_eq!(a.digest(), manifest().digest());
    }

    #[test]
    fn half_precision_converts_exactly() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert!(f16_to_f32(0x7c00).is_infinite());
    }
}

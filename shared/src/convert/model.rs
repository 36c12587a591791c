//! Manifests, model references and the model download stream.

use super::*;

impl TryFrom<pb::Manifest> for Manifest {
    type Error = ConvertError;
    fn try_from(m: pb::Manifest) -> Result<Self, ConvertError> {
        let mut tensors = Vec::with_capacity(m.tensors.len());
        for t in m.tensors {
            if t.name.is_empty() || t.name.len() > 256 {
                return Err(invalid("manifest.tensors.name", "names must have 1–256 characters"));
            }
            if t.dtype != pb::Dtype::F32 as i32 {
                return Err(invalid("manifest.tensors.dtype", format!("tensor `{}` is not F32", t.name)));
            }
            if t.shape.contains(&0) || t.shape.len() > 8 {
                return Err(invalid(
                    "manifest.tensors.shape",
                    format!("tensor `{}` has shape {:?}; dimensions must be ≥ 1, at most 8", t.name, t.shape),
                ));
            }
            let shape = t
                .shape
                .iter()
                .map(|&d| usize::try_from(d).map_err(|_| invalid("manifest.tensors.shape", "too large")))
                .collect::<Result<Vec<_>, _>>()?;
            tensors.push(TensorSpec { name: t.name, shape });
        }
        Ok(Manifest::new(tensors)?)
    }
}

impl From<&Manifest> for pb::Manifest {
    fn from(m: &Manifest) -> Self {
        pb::Manifest {
            tensors: m
                .tensors
                .iter()
                .map(|t| pb::TensorSpec {
                    name: t.name.clone(),
                    shape: t.shape.iter().map(|&d| d as u64).collect(),
                    dtype: pb::Dtype::F32 as i32,
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::ModelRef> for ModelRef {
    type Error = ConvertError;
    fn try_from(m: pb::ModelRef) -> Result<Self, ConvertError> {
        Ok(ModelRef {
            version: ModelVersion(m.version),
            full_manifest: digest("model.full_manifest_sha256", &m.full_manifest_sha256)?,
            full_payload: digest("model.full_payload_sha256", &m.full_payload_sha256)?,
            trainable_manifest: digest("model.trainable_manifest_sha256", &m.trainable_manifest_sha256)?,
            trainable_payload: digest("model.trainable_payload_sha256", &m.trainable_payload_sha256)?,
        })
    }
}

impl From<ModelRef> for pb::ModelRef {
    fn from(m: ModelRef) -> Self {
        pb::ModelRef {
            version: m.version.0,
            full_manifest_sha256: m.full_manifest.0.to_vec().into(),
            full_payload_sha256: m.full_payload.0.to_vec().into(),
            trainable_manifest_sha256: m.trainable_manifest.0.to_vec().into(),
            trainable_payload_sha256: m.trainable_payload.0.to_vec().into(),
        }
    }
}

fn scope_from(v: i32) -> Result<ModelScope, ConvertError> {
    match pb::ModelScope::try_from(v) {
        Ok(pb::ModelScope::Full) => Ok(ModelScope::Full),
        Ok(pb::ModelScope::Trainable) => Ok(ModelScope::Trainable),
        _ => Err(invalid("scope", format!("unknown model scope {v}"))),
    }
}

fn scope_to(s: ModelScope) -> i32 {
    match s {
        ModelScope::Full => pb::ModelScope::Full as i32,
        ModelScope::Trainable => pb::ModelScope::Trainable as i32,
    }
}

impl TryFrom<pb::DownloadModelRequest> for DownloadRequest {
    type Error = ConvertError;
    fn try_from(r: pb::DownloadModelRequest) -> Result<Self, ConvertError> {
        if r.offset % 4 != 0 {
            return Err(invalid("offset", format!("{} is not a multiple of 4", r.offset)));
        }
        Ok(DownloadRequest {
            version: ModelVersion(r.version),
            scope: scope_from(r.scope)?,
            offset: r.offset,
            max_chunk_bytes: (r.max_chunk_bytes != 0).then_some(r.max_chunk_bytes),
            base_version: r.base_version.map(ModelVersion),
        })
    }
}

impl From<DownloadRequest> for pb::DownloadModelRequest {
    fn from(r: DownloadRequest) -> Self {
        pb::DownloadModelRequest {
            version: r.version.0,
            scope: scope_to(r.scope),
            offset: r.offset,
            max_chunk_bytes: r.max_chunk_bytes.unwrap_or(0),
            base_version: r.base_version.map(|v| v.0),
        }
    }
}

impl TryFrom<pb::Chunk> for Chunk {
    type Error = ConvertError;
    fn try_from(c: pb::Chunk) -> Result<Self, ConvertError> {
        if c.data.is_empty() {
            return Err(invalid("chunk.data", "empty chunk"));
        }
        if c.data.len() > MAX_CHUNK_BYTES {
            return Err(invalid(
                "chunk.data",
                format!("{} bytes exceed the {MAX_CHUNK_BYTES}-byte chunk limit", c.data.len()),
            ));
        }
        Ok(Chunk { offset: c.offset, data: c.data })
    }
}

impl From<Chunk> for pb::Chunk {
    fn from(c: Chunk) -> Self {
        pb::Chunk { offset: c.offset, data: c.data }
    }
}

impl TryFrom<pb::ModelHeader> for ModelHeader {
    type Error = ConvertError;
    fn try_from(h: pb::ModelHeader) -> Result<Self, ConvertError> {
        let manifest: Manifest = h.manifest.ok_or(ConvertError::Missing("header.manifest"))?.try_into()?;
        let scope = scope_from(h.scope)?;
        let encoding = match pb::ModelEncoding::try_from(h.encoding) {
            Ok(pb::ModelEncoding::F32) => ModelEncoding::F32,
            Ok(pb::ModelEncoding::Int8Delta) if scope == ModelScope::Trainable => {
                ModelEncoding::Int8Delta { base: ModelVersion(h.base_version) }
            }
            Ok(pb::ModelEncoding::Int8Delta) => {
                return Err(invalid("header.encoding", "an 8-bit step is sent for the trainable scope only"))
            }
            Err(_) => {
                return Err(invalid("header.encoding", format!("unknown model encoding {}", h.encoding)))
            }
        };
        let expected = encoding.payload_bytes(manifest.numel());
        if h.total_bytes != expected {
            return Err(invalid(
                "header.total_bytes",
                format!("{} bytes but the manifest in this encoding has {expected}", h.total_bytes),
            ));
        }
        if h.start_offset > h.total_bytes || h.start_offset % 4 != 0 {
            return Err(invalid("header.start_offset", format!("{} is not a valid offset", h.start_offset)));
        }
        Ok(ModelHeader {
            version: ModelVersion(h.version),
            scope,
            manifest,
            total_bytes: h.total_bytes,
            payload_digest: digest("header.payload_sha256", &h.payload_sha256)?,
            start_offset: h.start_offset,
            encoding,
        })
    }
}

impl From<&ModelHeader> for pb::ModelHeader {
    fn from(h: &ModelHeader) -> Self {
        pb::ModelHeader {
            version: h.version.0,
            scope: scope_to(h.scope),
            manifest: Some((&h.manifest).into()),
            total_bytes: h.total_bytes,
            payload_sha256: h.payload_digest.0.to_vec().into(),
            start_offset: h.start_offset,
            encoding: match h.encoding {
                ModelEncoding::F32 => pb::ModelEncoding::F32 as i32,
                ModelEncoding::Int8Delta { .. } => pb::ModelEncoding::Int8Delta as i32,
            },
            base_version: match h.encoding {
                ModelEncoding::F32 => 0,
                ModelEncoding::Int8Delta { base } => base.0,
            },
        }
    }
}

impl TryFrom<pb::DownloadModelResponse> for DownloadItem {
    type Error = ConvertError;
    fn try_from(r: pb::DownloadModelResponse) -> Result<Self, ConvertError> {
        match r.item.ok_or(ConvertError::Missing("item"))? {
            pb::download_model_response::Item::Header(h) => Ok(DownloadItem::Header(h.try_into()?)),
            pb::download_model_response::Item::Chunk(c) => Ok(DownloadItem::Chunk(c.try_into()?)),
        }
    }
}

impl From<DownloadItem> for pb::DownloadModelResponse {
    fn from(i: DownloadItem) -> Self {
        let item = match i {
            DownloadItem::Header(h) => pb::download_model_response::Item::Header((&h).into()),
            DownloadItem::Chunk(c) => pb::download_model_response::Item::Chunk(c.into()),
        };
        pb::DownloadModelResponse { item: Some(item) }
    }
}

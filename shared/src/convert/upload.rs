//! The update upload stream: header, chunks, trailer, receipt.

use super::*;
use crate::compression::UpdateEncoding;

pub use crate::limits::MAX_NUM_EXAMPLES;

impl TryFrom<pb::UpdateHeader> for UpdateHeader {
    type Error = ConvertError;
    /// A plain upload's header; a masked one is refused here (see [`MaskedUpdateHeader`]), so
    /// a coordinator that does not run a secure round never takes masked values for a delta.
    fn try_from(h: pb::UpdateHeader) -> Result<Self, ConvertError> {
        if h.encoding == pb::UpdateEncoding::MaskedU32 as i32 {
            return Err(invalid("header.encoding", "masked_u32 uploads belong to secure rounds only"));
        }
        let encoding = match pb::UpdateEncoding::try_from(h.encoding) {
            Ok(pb::UpdateEncoding::F32Delta) => UpdateEncoding::F32,
            Ok(pb::UpdateEncoding::Int8Block) => UpdateEncoding::Int8,
            _ => {
                return Err(invalid("header.encoding", format!("unsupported update encoding {}", h.encoding)))
            }
        };
        if !h.secagg_context_sha256.is_empty() {
            return Err(invalid(
                "header.secagg_context_sha256",
                "only masked_u32 uploads name a secure round",
            ));
        }
        Ok(UpdateHeader { encoding, ..common_header(h)? })
    }
}

impl TryFrom<pb::UpdateHeader> for MaskedUpdateHeader {
    type Error = ConvertError;
    /// A masked upload's header: encoding `masked_u32` and a 32-byte round-context digest.
    fn try_from(mut h: pb::UpdateHeader) -> Result<Self, ConvertError> {
        if h.encoding != pb::UpdateEncoding::MaskedU32 as i32 {
            return Err(invalid(
                "header.encoding",
                format!("a secure round takes masked_u32 uploads, not encoding {}", h.encoding),
            ));
        }
        let context = std::mem::take(&mut h.secagg_context_sha256);
        let secagg_context = <[u8; 32]>::try_from(context.as_ref()).map_err(|_| {
            invalid(
                "header.secagg_context_sha256",
                format!("{} bytes, a round-context digest has 32", context.len()),
            )
        })?;
        Ok(MaskedUpdateHeader { header: common_header(h)?, secagg_context })
    }
}

/// The checks and fields a plain and a masked header share (both are 4-byte values).
fn common_header(h: pb::UpdateHeader) -> Result<UpdateHeader, ConvertError> {
    if h.num_examples == 0 || h.num_examples > MAX_NUM_EXAMPLES {
        return Err(invalid(
            "header.num_examples",
            format!("{} is outside 1..={MAX_NUM_EXAMPLES}", h.num_examples),
        ));
    }
    if h.round == 0 {
        return Err(invalid("header.round", "rounds start at 1"));
    }
    if h.total_bytes % 4 != 0 {
        return Err(invalid("header.total_bytes", "not a multiple of 4"));
    }
    Ok(UpdateHeader {
        id: RoundId::new(h.round, h.attempt),
        base_version: ModelVersion(h.base_model_version),
        num_examples: h.num_examples,
        metrics: finite_metrics("header.metrics", h.metrics)?,
        manifest_digest: digest("header.manifest_sha256", &h.manifest_sha256)?,
        total_bytes: h.total_bytes,
        encoding: UpdateEncoding::F32,
    })
}

/// Wire value of a plain upload's encoding.
pub(super) fn encoding_to_pb(e: UpdateEncoding) -> pb::UpdateEncoding {
    match e {
        UpdateEncoding::F32 => pb::UpdateEncoding::F32Delta,
        UpdateEncoding::Int8 => pb::UpdateEncoding::Int8Block,
    }
}

impl From<&UpdateHeader> for pb::UpdateHeader {
    fn from(h: &UpdateHeader) -> Self {
        pb::UpdateHeader {
            round: h.id.round,
            attempt: h.id.attempt,
            base_model_version: h.base_version.0,
            num_examples: h.num_examples,
            metrics: h.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            manifest_sha256: h.manifest_digest.0.to_vec().into(),
            total_bytes: h.total_bytes,
            encoding: encoding_to_pb(h.encoding) as i32,
            secagg_context_sha256: Default::default(),
        }
    }
}

impl From<&MaskedUpdateHeader> for pb::UpdateHeader {
    fn from(h: &MaskedUpdateHeader) -> Self {
        pb::UpdateHeader {
            encoding: pb::UpdateEncoding::MaskedU32 as i32,
            secagg_context_sha256: h.secagg_context.to_vec().into(),
            ..(&h.header).into()
        }
    }
}

impl TryFrom<pb::UpdateTrailer> for UpdateTrailer {
    type Error = ConvertError;
    fn try_from(t: pb::UpdateTrailer) -> Result<Self, ConvertError> {
        let signature = match (t.signature_scheme.is_empty(), t.signature.is_empty()) {
            (true, true) => None,
            (false, false) => {
                if t.signature.len() > 1024 || t.signature_scheme.len() > 32 {
                    return Err(invalid("trailer.signature", "signature or scheme too long"));
                }
                Some(UpdateSignature { scheme: t.signature_scheme, bytes: t.signature })
            }
            _ => return Err(invalid("trailer.signature", "a signature needs both a scheme and bytes")),
        };
        Ok(UpdateTrailer { payload_digest: digest("trailer.payload_sha256", &t.payload_sha256)?, signature })
    }
}

impl From<&UpdateTrailer> for pb::UpdateTrailer {
    fn from(t: &UpdateTrailer) -> Self {
        pb::UpdateTrailer {
            payload_sha256: t.payload_digest.0.to_vec().into(),
            signature_scheme: t.signature.as_ref().map(|s| s.scheme.clone()).unwrap_or_default(),
            signature: t.signature.as_ref().map(|s| s.bytes.clone()).unwrap_or_default(),
        }
    }
}

impl TryFrom<pb::UploadUpdateRequest> for UploadItem {
    type Error = ConvertError;
    fn try_from(r: pb::UploadUpdateRequest) -> Result<Self, ConvertError> {
        use pb::upload_update_request::Item;
        Ok(match r.item.ok_or(ConvertError::Missing("item"))? {
            Item::Header(h) => UploadItem::Header(h.try_into()?),
            Item::Chunk(c) => UploadItem::Chunk(c.try_into()?),
            Item::Trailer(t) => UploadItem::Trailer(t.try_into()?),
        })
    }
}

impl From<UploadItem> for pb::UploadUpdateRequest {
    fn from(i: UploadItem) -> Self {
        use pb::upload_update_request::Item;
        let item = match i {
            UploadItem::Header(h) => Item::Header((&h).into()),
            UploadItem::Chunk(c) => Item::Chunk(c.into()),
            UploadItem::Trailer(t) => Item::Trailer((&t).into()),
        };
        pb::UploadUpdateRequest { item: Some(item) }
    }
}

impl From<UploadReceipt> for pb::UploadUpdateResponse {
    fn from(r: UploadReceipt) -> Self {
        pb::UploadUpdateResponse {
            round: r.id.round,
            attempt: r.id.attempt,
            received_bytes: r.received_bytes,
        }
    }
}

impl From<pb::UploadUpdateResponse> for UploadReceipt {
    fn from(r: pb::UploadUpdateResponse) -> Self {
        UploadReceipt { id: RoundId::new(r.round, r.attempt), received_bytes: r.received_bytes }
    }
}

impl From<UploadReservation> for pb::ReserveUploadRequest {
    fn from(r: UploadReservation) -> Self {
        pb::ReserveUploadRequest { round: r.id.round, attempt: r.id.attempt, max_wait_ms: ms(r.max_wait) }
    }
}

impl From<pb::ReserveUploadRequest> for UploadReservation {
    fn from(r: pb::ReserveUploadRequest) -> Self {
        UploadReservation {
            id: RoundId::new(r.round, r.attempt),
            max_wait: Duration::from_millis(r.max_wait_ms),
        }
    }
}

impl From<UploadAdmission> for pb::ReserveUploadResponse {
    fn from(a: UploadAdmission) -> Self {
        match a {
            UploadAdmission::Granted { ttl } => {
                pb::ReserveUploadResponse { granted: true, grant_ttl_ms: ms(ttl), retry_after_ms: 0 }
            }
            UploadAdmission::RetryAfter(after) => {
                pb::ReserveUploadResponse { granted: false, grant_ttl_ms: 0, retry_after_ms: ms(after) }
            }
        }
    }
}

impl TryFrom<pb::ReserveUploadResponse> for UploadAdmission {
    type Error = ConvertError;
    /// A grant must say how long it lasts: a grant of 0 ms could never be used.
    fn try_from(r: pb::ReserveUploadResponse) -> Result<Self, ConvertError> {
        if r.granted {
            if r.grant_ttl_ms == 0 {
                return Err(ConvertError::Missing("grant_ttl_ms"));
            }
            Ok(UploadAdmission::Granted { ttl: Duration::from_millis(r.grant_ttl_ms) })
        } else {
            Ok(UploadAdmission::RetryAfter(Duration::from_millis(r.retry_after_ms)))
        }
    }
}

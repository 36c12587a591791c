use super::*;
use crate::schedule::LrSchedule;

fn header() -> pb::UpdateHeader {
    pb::UpdateHeader {
        round: 1,
        attempt: 0,
        base_model_version: 0,
        num_examples: 10,
        metrics: [("train_loss".to_string(), 0.5)].into_iter().collect(),
        manifest_sha256: vec![1; 32].into(),
        total_bytes: 16,
        encoding: pb::UpdateEncoding::F32Delta as i32,
        secagg_context_sha256: Default::default(),
    }
}

#[test]
fn a_valid_update_header_round_trips() {
    let domain = UpdateHeader::try_from(header()).unwrap();
    assert_eq!(pb::UpdateHeader::from(&domain), header());
}

#[test]
fn update_headers_with_bad_fields_are_refused_naming_the_field() {
    type Mutation = fn(&mut pb::UpdateHeader);
    let cases: Vec<(Mutation, &str)> = vec![
        (|h| h.num_examples = 0, "num_examples"),
        (|h| h.num_examples = 1 << 31, "num_examples"),
        (|h| h.encoding = 0, "encoding"),
        (|h| h.manifest_sha256 = vec![1; 31].into(), "manifest_sha256"),
        (|h| h.round = 0, "round"),
        (|h| h.total_bytes = 15, "total_bytes"),
        (|h| _ = h.metrics.insert("x".into(), f64::NAN), "metrics"),
        (|h| h.encoding = pb::UpdateEncoding::MaskedU32 as i32, "encoding"),
        (|h| h.secagg_context_sha256 = vec![1; 32].into(), "secagg_context_sha256"),
    ];
    for (mutate, field) in cases {
        let mut h = header();
        mutate(&mut h);
        let err = UpdateHeader::try_from(h).unwrap_err().to_string();
        assert!(err.contains(field), "{err} should name {field}");
    }
}

fn masked_header() -> pb::UpdateHeader {
    pb::UpdateHeader {
        encoding: pb::UpdateEncoding::MaskedU32 as i32,
        secagg_context_sha256: vec![9; 32].into(),
        ..header()
    }
}

#[test]
fn a_valid_masked_update_header_round_trips_with_its_round_context() {
    let domain = MaskedUpdateHeader::try_from(masked_header()).unwrap();
    assert_eq!(domain.secagg_context, [9; 32]);
    assert_eq!(domain.header, UpdateHeader::try_from(header()).unwrap());
    assert_eq!(pb::UpdateHeader::from(&domain), masked_header());
}

#[test]
fn masked_update_headers_with_bad_fields_are_refused_naming_the_field() {
    type Mutation = fn(&mut pb::UpdateHeader);
    let cases: Vec<(Mutation, &str)> = vec![
        (|h| h.encoding = pb::UpdateEncoding::F32Delta as i32, "encoding"),
        (|h| h.secagg_context_sha256 = Default::default(), "secagg_context_sha256"),
        (|h| h.secagg_context_sha256 = vec![9; 33].into(), "secagg_context_sha256"),
        (|h| h.total_bytes = 15, "total_bytes"),
        (|h| h.num_examples = 0, "num_examples"),
    ];
    for (mutate, field) in cases {
        let mut h = masked_header();
        mutate(&mut h);
        let err = MaskedUpdateHeader::try_from(h).unwrap_err().to_string();
        assert!(err.contains(field), "{err} should name {field}");
    }
}

#[test]
fn chunks_over_the_limit_are_refused() {
    let big = pb::Chunk { offset: 0, data: vec![0; MAX_CHUNK_BYTES + 1].into() };
    assert!(Chunk::try_from(big).is_err());
    assert!(Chunk::try_from(pb::Chunk { offset: 0, data: Default::default() }).is_err());
}

#[test]
fn manifests_round_trip_and_refuse_zero_dimensions() {
    let m = Manifest::new(vec![TensorSpec { name: "w".into(), shape: vec![2, 3] }]).unwrap();
    let wire = pb::Manifest::from(&m);
    assert_eq!(Manifest::try_from(wire.clone()).unwrap(), m);
    let mut bad = wire;
    bad.tensors[0].shape = vec![0, 3];
    assert!(Manifest::try_from(bad).is_err());
}

#[test]
fn a_fit_task_round_trips() {
    let Task::Fit(mut fit) = fit_task() else { unreachable!() };
    fit.config.max_steps = Some(20);
    fit.config.lr_schedule = LrSchedule::Cosine;
    fit.config.warmup_steps = 3;
    let task = Task::Fit(fit);
    let back = Task::try_from(pb::WaitForTaskResponse::from(task.clone())).unwrap();
    assert_eq!(back, task);
}

fn secure_fit_task() -> Task {
    use crate::crypto::KeyPair;
    use crate::secagg::{RoundSetup, SecureTask};
    let members = (0..3)
        .map(|i| {
            (
                ClientId::parse(&format!("site-{i}")).unwrap(),
                KeyPair::generate_ephemeral().unwrap().public_key(),
            )
        })
        .collect();
    let Task::Fit(mut fit) = fit_task() else { unreachable!() };
    fit.secure_aggregation = Some(std::sync::Arc::new(SecureTask {
        setup: RoundSetup {
            federation_id: "fed".into(),
            round: 4,
            attempt: 1,
            members,
            threshold: 2,
            degree: 2,
            graph_seed: [8; 32],
            vector_len: 1000,
        },
        grid_log2: -20,
        clip_norm: 1.0,
        noise_sigma_grid: 300.5,
        max_wrap_probability: 1e-9,
    }));
    Task::Fit(fit)
}

fn fit_task() -> Task {
    let d = Sha256([3; 32]);
    Task::Fit(FitTask {
        id: RoundId::new(4, 1),
        model: ModelRef {
            version: ModelVersion(3),
            full_manifest: d,
            full_payload: d,
            trainable_manifest: d,
            trainable_payload: d,
        },
        config: FitInstructions {
            epochs: 1,
            batch_size: 8,
            learning_rate: 1e-4,
            proximal_mu: 0.01,
            max_steps: None,
            seed: 9,
            lr_schedule: LrSchedule::Constant,
            warmup_steps: 0,
            update_encoding: Default::default(),
        },
        deadline_in: Duration::from_secs(60),
        deadline_unix_ms: 1,
        privacy: PrivacyInstructions::NONE,
        secure_aggregation: None,
    })
}

#[test]
fn a_secure_fit_task_round_trips_and_its_encoding_is_the_same_on_both_sides() {
    let task = secure_fit_task();
    let back = Task::try_from(pb::WaitForTaskResponse::from(task.clone())).unwrap();
    assert_eq!(back, task);
    let (Task::Fit(a), Task::Fit(b)) = (task, back) else { unreachable!() };
    let (a, b) = (a.secure_aggregation.unwrap(), b.secure_aggregation.unwrap());
    assert_eq!(a.encoding().unwrap(), b.encoding().unwrap());
}

#[test]
fn a_secure_fit_task_with_bad_encoding_parameters_is_refused_naming_the_field() {
    type Edit = fn(&mut pb::SecureAggregationTask);
    let cases: [(Edit, &str); 5] = [
        (|t| t.setup = None, "secure_aggregation.setup"),
        (|t| t.grid_log2 = 300, "secure_aggregation.grid_log2"),
        (|t| t.clip_norm = f64::NAN, "secure_aggregation.clip_norm"),
        (|t| t.noise_sigma_grid = -1.0, "secure_aggregation.noise_sigma_grid"),
        (|t| t.max_wrap_probability = 0.0, "secure_aggregation.max_wrap_probability"),
    ];
    for (edit, field) in cases {
        let mut wire = pb::WaitForTaskResponse::from(secure_fit_task());
        let Some(pb::wait_for_task_response::Task::Fit(f)) = wire.task.as_mut() else { unreachable!() };
        edit(f.secure_aggregation.as_mut().unwrap());
        let err = Task::try_from(wire).unwrap_err().to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
}

fn fit_config(lr_schedule: LrSchedule, warmup_steps: u64) -> FitInstructions {
    FitInstructions {
        epochs: 2,
        batch_size: 16,
        learning_rate: 5e-5,
        proximal_mu: 0.0,
        max_steps: None,
        seed: 1,
        lr_schedule,
        warmup_steps,
        update_encoding: Default::default(),
    }
}

#[test]
fn every_learning_rate_schedule_and_its_warmup_round_trip() {
    for shape in LrSchedule::ALL {
        let config = fit_config(shape, 7);
        let wire = pb::FitConfig::from(&config);
        assert_eq!(wire.warmup_steps, 7);
        assert_ne!(wire.lr_schedule, pb::LrSchedule::Unspecified as i32, "{shape} is sent explicitly");
        assert_eq!(FitInstructions::try_from(wire).unwrap(), config);
    }
}

#[test]
fn an_unspecified_learning_rate_schedule_reads_as_constant() {
    let wire = pb::FitConfig {
        lr_schedule: pb::LrSchedule::Unspecified as i32,
        ..(&fit_config(LrSchedule::Linear, 0)).into()
    };
    assert_eq!(FitInstructions::try_from(wire).unwrap().lr_schedule, LrSchedule::Constant);
}

#[test]
fn an_unknown_learning_rate_schedule_is_refused_naming_the_field() {
    let wire = pb::FitConfig { lr_schedule: 42, ..(&fit_config(LrSchedule::Linear, 0)).into() };
    let err = FitInstructions::try_from(wire).unwrap_err().to_string();
    assert!(err.contains("config.lr_schedule") && err.contains("42"), "{err}");
}

fn join_response() -> JoinResponse {
    let digest = Sha256([7; 32]);
    JoinResponse {
        client_id: ClientId::parse("site-1").unwrap(),
        session_token: "token".into(),
        protocol_version: pb::PROTOCOL_VERSION,
        heartbeat_interval: Duration::from_secs(1),
        liveness_timeout: Duration::from_secs(10),
        model: ModelRef {
            version: ModelVersion(3),
            full_manifest: digest,
            full_payload: digest,
            trainable_manifest: digest,
            trainable_payload: digest,
        },
        trainable_manifest: Manifest::new(vec![TensorSpec { name: "w".into(), shape: vec![2] }]).unwrap(),
        limits: Limits::of_protocol(1 << 20),
        labels: vec!["neg".into(), "pos".into()],
        adapter: None,
        init_seed: Some(42),
    }
}

#[test]
fn a_join_response_carries_the_init_seed_and_an_older_coordinators_lack_of_one() {
    let wire = pb::JoinResponse::from(join_response());
    assert_eq!(wire.init_seed, Some(42));
    assert_eq!(JoinResponse::try_from(wire).unwrap(), join_response());
    let older = pb::JoinResponse { init_seed: None, ..pb::JoinResponse::from(join_response()) };
    assert_eq!(JoinResponse::try_from(older).unwrap().init_seed, None);
}

#[test]
fn an_int8_step_header_round_trips_sizes_its_payload_in_blocks_and_is_refused_for_the_full_scope() {
    // 300 values: two INT8_BLOCK blocks of 260 bytes, against 1200 bytes in f32.
    let manifest = Manifest::new(vec![TensorSpec { name: "w".into(), shape: vec![300] }]).unwrap();
    let header = ModelHeader {
        version: ModelVersion(4),
        scope: ModelScope::Trainable,
        manifest: manifest.clone(),
        total_bytes: 520,
        payload_digest: Sha256([1; 32]),
        start_offset: 260,
        encoding: ModelEncoding::Int8Delta { base: ModelVersion(3) },
    };
    let wire = pb::ModelHeader::from(&header);
    assert_eq!((wire.encoding, wire.base_version), (pb::ModelEncoding::Int8Delta as i32, 3));
    assert_eq!(ModelHeader::try_from(wire.clone()).unwrap(), header);
    let f32_sized = pb::ModelHeader { total_bytes: 1200, ..wire.clone() };
    assert!(ModelHeader::try_from(f32_sized).unwrap_err().to_string().contains("total_bytes"));
    let full = pb::ModelHeader { scope: pb::ModelScope::Full as i32, ..wire.clone() };
    assert!(ModelHeader::try_from(full).unwrap_err().to_string().contains("header.encoding"));
    let unknown = pb::ModelHeader { encoding: 9, ..wire };
    assert!(ModelHeader::try_from(unknown).unwrap_err().to_string().contains("header.encoding"));
    let request = DownloadRequest {
        version: ModelVersion(4),
        scope: ModelScope::Trainable,
        offset: 0,
        max_chunk_bytes: None,
        base_version: Some(ModelVersion(0)),
    };
    assert_eq!(DownloadRequest::try_from(pb::DownloadModelRequest::from(request)).unwrap(), request);
}

#[test]
fn a_join_response_carries_the_lora_adapter_and_refuses_an_invalid_one() {
    let lora = crate::bert::lora::LoraConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.1,
        target_modules: vec!["query".into(), "value".into()],
        seed: 42,
    };
    let with = JoinResponse { adapter: Some(AdapterSpec { lora, a_digest: [3; 32] }), ..join_response() };
    assert_eq!(JoinResponse::try_from(pb::JoinResponse::from(with.clone())).unwrap(), with);
    let mut wire = pb::JoinResponse::from(with);
    wire.adapter.as_mut().unwrap().rank = 0;
    let err = JoinResponse::try_from(wire).unwrap_err().to_string();
    assert!(err.contains("adapter") && err.contains("rank"), "{err}");
}

#[test]
fn a_join_response_carries_the_protocols_update_value_bound() {
    let wire = pb::JoinResponse::from(join_response());
    assert_eq!(wire.limits.as_ref().unwrap().max_abs_update_value, crate::limits::MAX_ABS_UPDATE_VALUE);
    assert_eq!(JoinResponse::try_from(wire).unwrap(), join_response());
}

#[test]
fn clients_cut_chunks_within_the_advertised_maximum_and_on_value_boundaries() {
    let limits = |default_chunk_bytes, max_chunk_bytes| Limits {
        default_chunk_bytes,
        max_chunk_bytes,
        ..Limits::of_protocol(0)
    };
    assert_eq!(limits(1 << 20, 4 << 20).chunk_bytes(), 1 << 20);
    assert_eq!(limits(8 << 20, 4 << 20).chunk_bytes(), 4 << 20);
    assert_eq!(limits(1_000_003, 4 << 20).chunk_bytes(), 1_000_000);
    assert_eq!(limits(0, 4 << 20).chunk_bytes(), 4);
}

#[test]
fn a_join_response_without_a_usable_value_bound_is_a_protocol_error() {
    // 0 is what a coordinator that does not know the field sends.
    for bound in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let mut wire = pb::JoinResponse::from(join_response());
        wire.limits.as_mut().unwrap().max_abs_update_value = bound;
        let err = JoinResponse::try_from(wire).unwrap_err().to_string();
        assert!(err.contains("limits.max_abs_update_value"), "{bound}: {err}");
    }
}

fn round_summary(secure: Option<SecureRoundFigures>) -> RoundSummary {
    RoundSummary {
        id: RoundId::new(3, 1),
        status: "completed".into(),
        selected: 5,
        accepted: 4,
        failed: 1,
        total_examples: 4,
        train_loss: f64::NAN,
        eval_loss: 0.5,
        eval_accuracy: 0.75,
        eval_examples: 10,
        duration: Duration::from_millis(1500),
        reason: String::new(),
        bytes_sent: 10,
        bytes_received: 20,
        epsilon: Some(1.25),
        local_epsilon: None,
        secure,
    }
}

fn status_with(rounds: Vec<RoundSummary>) -> StatusReport {
    StatusReport {
        protocol_version: 1,
        phase: PhaseName::Finished,
        round: RoundId::new(3, 1),
        model_version: ModelVersion(3),
        total_rounds: 3,
        strategy: "fedavg".into(),
        deadline_in: None,
        clients: vec![],
        recent_rounds: rounds,
        accepted_updates: 0,
        privacy: PrivacyStatus::none(),
        finished_reason: None,
    }
}

#[test]
fn round_summaries_carry_the_secure_figures_of_secure_rounds_and_none_for_plain_ones() {
    let secure = Some(SecureRoundFigures { clients: 5, threshold: 3, degree: 4 });
    let sent = status_with(vec![round_summary(secure), round_summary(None)]);
    let wire = pb::GetStatusResponse::from(&sent);
    let r = &wire.recent_rounds;
    assert_eq!((r[0].secagg_clients, r[0].secagg_threshold, r[0].secagg_degree), (Some(5), Some(3), Some(4)));
    assert_eq!((r[1].secagg_clients, r[1].secagg_threshold, r[1].secagg_degree), (None, None, None));
    let back = StatusReport::try_from(wire).unwrap();
    assert_eq!(back.recent_rounds[0].secure, secure);
    assert_eq!(back.recent_rounds[1].secure, None);
    assert_eq!(back.recent_rounds[0].accepted, 4, "the survivors");
}

#[test]
fn a_round_summary_with_part_of_the_secure_figures_reads_as_a_plain_round() {
    let mut wire = pb::GetStatusResponse::from(&status_with(vec![round_summary(None)]));
    wire.recent_rounds[0].secagg_threshold = Some(3);
    wire.recent_rounds[0].secagg_clients = Some(5);
    let back = StatusReport::try_from(wire).unwrap();
    assert_eq!(back.recent_rounds[0].secure, None);
}

#[test]
fn upload_reservations_and_their_answers_round_trip_and_a_grant_without_a_lifetime_is_refused() {
    let ask = UploadReservation { id: RoundId::new(7, 2), max_wait: Duration::from_millis(1500) };
    assert_eq!(UploadReservation::from(pb::ReserveUploadRequest::from(ask)), ask);
    for answer in [
        UploadAdmission::Granted { ttl: Duration::from_secs(30) },
        UploadAdmission::RetryAfter(Duration::from_secs(1)),
    ] {
        assert_eq!(UploadAdmission::try_from(pb::ReserveUploadResponse::from(answer)).unwrap(), answer);
    }
    let unusable = pb::ReserveUploadResponse { granted: true, grant_ttl_ms: 0, retry_after_ms: 0 };
    let err = UploadAdmission::try_from(unusable).unwrap_err();
    assert!(err.to_string().contains("grant_ttl_ms"), "{err}");
}

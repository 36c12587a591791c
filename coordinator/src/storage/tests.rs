use fedtune_shared::privacy::{NoisePlacement, PrivacyLedgerEntry, SamplingScheme};

use super::*;

fn id(s: &str) -> ClientId {
    ClientId::parse(s).unwrap()
}

#[test]
fn the_coordinator_and_a_clients_command_may_open_a_new_state_directory_at_the_same_moment() {
    // Each pair of opens races on a fresh file: the WAL switch and the schema creation
    // must wait for each other instead of failing with "database is locked".
    for _ in 0..30 {
        let dir = tempfile::tempdir().unwrap();
        let start = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            let coordinator = s.spawn(|| {
                start.wait();
                Storage::open(dir.path()).map(drop).map_err(|e| e.to_string())
            });
            let clients_add = s.spawn(|| {
                start.wait();
                let list = crate::auth::Allowlist::open(dir.path()).map_err(|e| e.to_string())?;
                list.federation_id().map(drop).map_err(|e| e.to_string())
            });
            coordinator.join().unwrap().unwrap();
            clients_add.join().unwrap().unwrap();
        });
    }
}

#[test]
fn the_state_directory_is_owner_only_whatever_umask_created_it() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    Storage::open(&state).unwrap();
    assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
}

#[test]
fn a_completed_round_is_visible_with_its_checkpoint_and_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    let st = Storage::open(dir.path()).unwrap();
    st.call_sync(|c| {
        upsert_client(c, &id("a"), None, 10, 2)?;
        let sample = SampleRecord {
            id: RoundId::new(1, 0),
            kind: "fit",
            scheme: "fraction(1)".into(),
            seed: "00".into(),
            candidates: 1,
            selected: vec![id("a")],
            local_noise_multiplier: None,
            secure: None,
        };
        begin_round(c, RoundId::new(1, 0), ModelVersion(0), &sample)?;
        let commit = RoundCommit {
            id: RoundId::new(1, 0),
            checkpoint: "x".into(),
            strategy_state: None,
            full_sha256: Sha256([1; 32]),
            outcomes: vec![ClientOutcome {
                client: id("a"),
                outcome: ParticipantOutcome::Accepted,
                num_examples: Some(10),
                metrics: serde_json::json!({}),
            }],
            accepted: 1,
            failed: 0,
            total_examples: 10,
            train_loss: Some(0.5),
            bytes_sent: 100,
            bytes_received: 40,
        };
        commit_round(c, &commit, Some(&ledger_record(1, 0.5)))?;
        let latest = latest_checkpoint(c)?.unwrap();
        assert_eq!(latest.version, ModelVersion(1));
        let rounds = recent_rounds(c, 5)?;
        assert_eq!(rounds[0].status, "completed");
        assert_eq!(rounds[0].accepted, 1);
        assert_eq!((rounds[0].bytes_sent, rounds[0].bytes_received), (100, 40));
        assert_eq!(load_clients(c)?[0].rounds_contributed, 1);
        assert_eq!(sampled_clients(c, RoundId::new(1, 0), "fit")?.len(), 1);
        let eps: f64 =
            c.query_row("SELECT epsilon FROM privacy_ledger WHERE version = 1", [], |r| r.get(0))?;
        assert_eq!(eps, 0.5);
        Ok(())
    })
    .unwrap();
}

#[test]
fn rounds_left_running_are_aborted_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let st = Storage::open(dir.path()).unwrap();
        st.call_sync(|c| {
            let s = SampleRecord {
                id: RoundId::new(1, 0),
                kind: "fit",
                scheme: "s".into(),
                seed: "0".into(),
                candidates: 0,
                selected: vec![],
                local_noise_multiplier: None,
                secure: None,
            };
            begin_round(c, RoundId::new(1, 0), ModelVersion(0), &s)
        })
        .unwrap();
    }
    let st = Storage::open(dir.path()).unwrap();
    st.call_sync(|c| {
        assert_eq!(abort_running(c)?, 1);
        assert_eq!(next_attempt(c, 1)?, 1);
        assert_eq!(recent_rounds(c, 1)?[0].status, "aborted");
        Ok(())
    })
    .unwrap();
}

#[test]
fn a_pinned_key_is_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let st = Storage::open(dir.path()).unwrap();
    st.call_sync(|c| {
        upsert_client(c, &id("a"), Some([1; 32]), 0, 0)?;
        upsert_client(c, &id("a"), Some([2; 32]), 0, 0)?;
        assert_eq!(load_clients(c)?[0].public_key, Some([1; 32]));
        Ok(())
    })
    .unwrap();
}

fn ledger_record(round: u64, epsilon: f64) -> LedgerRecord {
    LedgerRecord {
        entry: PrivacyLedgerEntry {
            round,
            sampling: SamplingScheme::Full,
            placement: NoisePlacement::Central,
            sampling_rate: 1.0,
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            sampled: 2,
            reported: 2,
            delta: 1e-5,
            epsilon_after: epsilon,
        },
        expected_clients: 2.0,
        next_clip_norm: 0.9,
        local_epsilon: None,
        charged_at_release: false,
    }
}

#[test]
fn a_ledger_record_reads_back_as_it_was_committed() {
    let dir = tempfile::tempdir().unwrap();
    let st = Storage::open(dir.path()).unwrap();
    let record = ledger_record(1, 0.5);
    st.call_sync(|c| {
        commit_sampled(c, &empty_draw(RoundId::new(1, 0)), &record)?;
        assert_eq!(ledger::load(c)?, std::slice::from_ref(&record));
        assert_eq!(completed_rounds(c)?, 1);
        let mechanism: String =
            c.query_row("SELECT mechanism FROM privacy_ledger WHERE version = 1", [], |r| r.get(0))?;
        assert_eq!(mechanism, "gaussian/central");
        Ok(())
    })
    .unwrap();
}

#[test]
fn a_ledger_row_written_by_an_earlier_coordinator_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    let st = Storage::open(dir.path()).unwrap();
    // The `detail` column exactly as coordinators before the single ledger type wrote it.
    let detail = r#"{"entry":{"round":3,"sampling":"poisson","placement":"local","sampling_rate":0.5,"noise_multiplier":1.1,"clip_norm":1.0,"sampled":4,"reported":3,"delta":1e-5,"epsilon_after":2.5},"expected_clients":4.0,"next_clip_norm":1.0}"#;
    st.call_sync(|c| {
        c.execute(
            "INSERT INTO privacy_ledger \
             (version, round, mechanism, sampling_rate, noise_multiplier, clip_norm, epsilon, delta, detail) \
             VALUES (3, 3, 'gaussian/local', 0.5, 1.1, 1.0, 2.5, 1e-5, ?1)",
            [detail],
        )?;
        let rows = ledger::load(c)?;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].version(), ModelVersion(3));
        assert_eq!(rows[0].mechanism(), "gaussian/local");
        assert_eq!((rows[0].entry.sampled, rows[0].entry.reported), (4, 3));
        assert_eq!(rows[0].entry.epsilon_after, 2.5);
        Ok(())
    })
    .unwrap();
}

#[test]
fn each_clients_exposure_composes_the_multiplier_recorded_with_every_draw_it_was_in() {
    let dir = tempfile::tempdir().unwrap();
    let st = Storage::open(dir.path()).unwrap();
    st.call_sync(|c| {
        let draw = |round: u64, attempt: u32, who: &[&str], z: Option<f64>| SampleRecord {
            id: RoundId::new(round, attempt),
            kind: "fit",
            scheme: "poisson(q=0.5)".into(),
            seed: "00".into(),
            candidates: 3,
            selected: who.iter().map(|w| id(w)).collect(),
            local_noise_multiplier: z,
            secure: None,
        };
        // Round 1 attempt 0 failed after the draw; attempt 1 completed; round 2 at a lower z;
        // a draw from before multipliers were recorded.
        begin_round(c, RoundId::new(1, 0), ModelVersion(0), &draw(1, 0, &["a", "b"], Some(1.0)))?;
        begin_round(c, RoundId::new(1, 1), ModelVersion(0), &draw(1, 1, &["a"], Some(1.0)))?;
        begin_round(c, RoundId::new(2, 0), ModelVersion(1), &draw(2, 0, &["b"], Some(0.5)))?;
        begin_round(c, RoundId::new(3, 0), ModelVersion(2), &draw(3, 0, &["a"], None))?;
        // An evaluation draw is no fit attempt.
        insert_sample(c, &SampleRecord { kind: "evaluate", ..draw(2, 0, &["a", "b"], None) })?;
        let all = ledger::exposures_by_client(c)?;
        assert_eq!(all["a"], ledger::Exposure { participations: 3, inverse_variance: 2.0, unrecorded: 1 });
        assert_eq!(all["b"], ledger::Exposure { participations: 2, inverse_variance: 5.0, unrecorded: 0 });
        let split = ledger::exposures(c, &[id("b"), id("new")])?;
        assert_eq!(split.drawn, vec![all["b"], ledger::Exposure::default()]);
        assert_eq!(split.others, vec![all["a"]]);
        Ok(())
    })
    .unwrap();
}

#[test]
fn a_completed_rounds_summary_carries_the_local_epsilon_its_ledger_row_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let st = Storage::open(dir.path()).unwrap();
    let record = LedgerRecord { local_epsilon: Some(3.25), ..ledger_record(1, 0.5) };
    st.call_sync(|c| {
        let sample = SampleRecord { local_noise_multiplier: Some(1.0), ..empty_draw(RoundId::new(1, 0)) };
        commit_sampled(c, &sample, &record)?;
        let rounds = recent_rounds(c, 5)?;
        assert_eq!((rounds[0].epsilon, rounds[0].local_epsilon), (Some(0.5), Some(3.25)));
        assert_eq!(ledger::load(c)?, vec![record.clone()]);
        Ok(())
    })
    .unwrap();
}

/// A draw of nobody into attempt `id`.
fn empty_draw(id: RoundId) -> SampleRecord {
    SampleRecord {
        id,
        kind: "fit",
        scheme: "fraction(1)".into(),
        seed: "00".into(),
        candidates: 0,
        selected: vec![],
        local_noise_multiplier: None,
        secure: None,
    }
}

/// Records the draw `sample` and commits its attempt with the ledger record `record`.
fn commit_sampled(
    c: &mut rusqlite::Connection,
    sample: &SampleRecord,
    record: &LedgerRecord,
) -> Result<(), StorageError> {
    let id = sample.id;
    begin_round(c, id, ModelVersion(id.round - 1), sample)?;
    let commit = RoundCommit {
        id,
        checkpoint: "x".into(),
        strategy_state: None,
        full_sha256: Sha256([1; 32]),
        outcomes: vec![],
        accepted: 0,
        failed: 0,
        total_examples: 0,
        train_loss: None,
        bytes_sent: 0,
        bytes_received: 0,
    };
    commit_round(c, &commit, Some(record))
}

fn commit_attempt(
    c: &mut rusqlite::Connection,
    id: RoundId,
    record: &LedgerRecord,
) -> Result<(), StorageError> {
    commit_sampled(c, &empty_draw(id), record)
}

#[test]
fn a_release_counts_from_the_moment_it_is_recorded_and_moves_to_the_ledger_when_its_attempt_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let st = Storage::open(dir.path()).unwrap();
    st.call_sync(|c| {
        // Round 1, attempt 0: released for unmasking, then failed (e.g. a sum that decoded out
        // of range). Attempt 1: released and published.
        let failed = LedgerRecord { charged_at_release: true, ..ledger_record(1, 0.5) };
        ledger::record_release(c, RoundId::new(1, 0), &failed)?;
        assert_eq!(ledger::load(c)?, vec![failed.clone()], "a crash here must not lose the charge");
        let published = LedgerRecord { charged_at_release: true, ..ledger_record(1, 0.9) };
        ledger::record_release(c, RoundId::new(1, 1), &published)?;
        commit_attempt(c, RoundId::new(1, 1), &published)?;
        // Both charges, the failed attempt's first, and the published one only once.
        assert_eq!(ledger::load(c)?, vec![failed.clone(), published.clone()]);
        let releases: i64 = c.query_row("SELECT COUNT(*) FROM privacy_releases", [], |r| r.get(0))?;
        assert_eq!(releases, 1, "the published attempt's release became its ledger row");
        // Round 2 is charged after both of round 1's.
        let next = ledger_record(2, 1.2);
        commit_attempt(c, RoundId::new(2, 0), &next)?;
        assert_eq!(ledger::load(c)?, vec![failed, published, next]);
        Ok(())
    })
    .unwrap();
}

#[test]
fn a_secure_attempts_roster_threshold_and_degree_read_back_with_its_summary_and_plain_ones_have_none() {
    let dir = tempfile::tempdir().unwrap();
    let st = Storage::open(dir.path()).unwrap();
    let figures = SecureRoundFigures { clients: 5, threshold: 3, degree: 4 };
    st.call_sync(|c| {
        let draw = |round: u64, attempt: u32, secure: Option<SecureRoundFigures>| SampleRecord {
            id: RoundId::new(round, attempt),
            kind: "fit",
            scheme: "fraction(1)".into(),
            seed: "00".into(),
            candidates: 5,
            selected: ["a", "b", "c", "d", "e"].iter().map(|w| id(w)).collect(),
            local_noise_multiplier: None,
            secure,
        };
        // Attempt 0 of round 1 fell below the threshold; attempt 1 completed with 4 survivors;
        // round 2 ran plain.
        begin_round(c, RoundId::new(1, 0), ModelVersion(0), &draw(1, 0, Some(figures)))?;
        let below = AttemptFailure::SecureAggregation("2 of 5 answered, below t = 3".into());
        fail_round(c, RoundId::new(1, 0), &below, &[], 2, (0, 0))?;
        let retry = SecureRoundFigures { clients: 5, threshold: 4, degree: 4 };
        begin_round(c, RoundId::new(1, 1), ModelVersion(0), &draw(1, 1, Some(retry)))?;
        let commit = RoundCommit {
            id: RoundId::new(1, 1),
            checkpoint: "x".into(),
            strategy_state: None,
            full_sha256: Sha256([1; 32]),
            outcomes: vec![],
            accepted: 4,
            failed: 1,
            total_examples: 4,
            train_loss: None,
            bytes_sent: 0,
            bytes_received: 0,
        };
        commit_round(c, &commit, None)?;
        begin_round(c, RoundId::new(2, 0), ModelVersion(1), &draw(2, 0, None))?;
        let rounds = recent_rounds(c, 5)?;
        let by_id = |round, attempt| rounds.iter().find(|r| r.id == RoundId::new(round, attempt)).unwrap();
        assert_eq!((by_id(1, 0).secure, by_id(1, 0).accepted), (Some(figures), 2));
        assert_eq!((by_id(1, 1).secure, by_id(1, 1).accepted), (Some(retry), 4), "4 survivors of 5");
        assert_eq!(by_id(2, 0).secure, None);
        Ok(())
    })
    .unwrap();
}

#[test]
fn a_state_directory_from_before_secure_rounds_were_recorded_gains_their_table_on_open() {
    let dir = tempfile::tempdir().unwrap();
    Storage::open(dir.path()).unwrap();
    {
        let c = rusqlite::Connection::open(dir.path().join("state.sqlite")).unwrap();
        c.execute_batch("DROP TABLE secure_rounds").unwrap();
    }
    let st = Storage::open(dir.path()).unwrap();
    st.call_sync(|c| {
        let n: i64 = c.query_row("SELECT COUNT(*) FROM secure_rounds", [], |r| r.get(0))?;
        assert_eq!(n, 0);
        Ok(())
    })
    .unwrap();
}

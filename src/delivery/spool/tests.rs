use super::*;
use crate::event::parse_structured;
use crate::routing::EndpointSet;

fn options(dir: &Path) -> SpoolOptions {
    SpoolOptions {
        path: dir.join("spool"),
        max_bytes: 64 << 20,
        commit_interval: Duration::ZERO,
        memory_bytes: 4 << 20,
    }
}

fn envelope(id: &str, in_memory: bool) -> Arc<Envelope> {
    let text =
        format!(r#"{{"specversion":"1.0","id":"{id}","source":"s","type":"t","data":{{"n":"{id}"}}}}"#);
    let mut e = Envelope::new(parse_structured(text.as_bytes()).unwrap());
    if in_memory {
        e.budget = Some(super::super::BudgetShare { budget: Arc::new(Default::default()), bytes: 0 });
    }
    Arc::new(e)
}

/// Appends events (id, indexes of the writers it goes to) and waits until they are stored.
async fn append(
    spool: &DiskSpool,
    writers: &[&dyn QueueWriter],
    events: &[(&str, &[usize])],
) -> Result<(), ReserveError> {
    let mut per_target = vec![0; writers.len()];
    let routed = events
        .iter()
        .map(|(id, to)| {
            to.iter().for_each(|&i| per_target[i] += 1);
            (envelope(id, true), to.iter().copied().collect::<EndpointSet>())
        })
        .collect();
    match spool.append(Routed { targets: writers, events: routed, per_target: &per_target }) {
        Ok(Durability::Pending(rx)) => rx.await.unwrap().map_err(ReserveError::Storage),
        Ok(Durability::Now) => panic!("the disk spool acknowledged before storing"),
        Err((why, back)) => {
            assert_eq!(back.len(), events.len(), "a refused submission gives its events back");
            Err(why)
        }
    }
}

async fn take(reader: &mut Box<dyn QueueReader>, max: usize) -> Vec<Arc<Envelope>> {
    let mut buffer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), reader.recv_many(&mut buffer, max))
        .await
        .expect("the reader got nothing");
    buffer
}

fn ids(events: &[Arc<Envelope>]) -> Vec<String> {
    events.iter().map(|e| e.event.id().to_owned()).collect()
}

#[tokio::test]
async fn an_event_for_two_endpoints_is_stored_once_and_removed_when_both_are_done() {
    let dir = tempfile::tempdir().unwrap();
    let spool = DiskSpool::open(&options(dir.path())).unwrap();
    let (wa, mut ra) = spool.open("a", 100);
    let (wb, mut rb) = spool.open("b", 100);
    append(&spool, &[&*wa, &*wb], &[("1", &[0, 1]), ("2", &[1])]).await.unwrap();
    assert_eq!(spool.record_count(), 2, "one record per event, not per endpoint");
    let a = take(&mut ra, 10).await;
    let b = take(&mut rb, 10).await;
    assert_eq!(ids(&a), ["1"]);
    assert_eq!(ids(&b), ["1", "2"]);
    for e in &b {
        rb.done(e);
    }
    spool.housekeeping().await;
    // Records go in order: 2, done everywhere, waits behind 1, which a still holds.
    assert_eq!(spool.record_count(), 2, "event 1 is kept while a is not done with it");
    ra.done(&a[0]);
    spool.housekeeping().await;
    assert_eq!(spool.record_count(), 0);
    assert_eq!(spool.stored_bytes(), 0, "the byte count follows deletions");
}

#[tokio::test]
async fn after_a_restart_each_endpoint_resumes_from_its_own_position() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = DiskSpool::open(&options(dir.path())).unwrap();
        let (wa, mut ra) = spool.open("a", 100);
        let (wb, mut rb) = spool.open("b", 100);
        let events: Vec<(String, &[usize])> = (1..=6).map(|i| (i.to_string(), &[0usize, 1][..])).collect();
        let events: Vec<(&str, &[usize])> = events.iter().map(|(i, t)| (i.as_str(), *t)).collect();
        append(&spool, &[&*wa, &*wb], &events).await.unwrap();
        for e in take(&mut ra, 10).await {
            ra.done(&e);
        }
        // b finished 1, 2 and 4; 3 is still in flight when the process goes.
        let b = take(&mut rb, 10).await;
        for i in [0, 1, 3] {
            rb.done(&b[i]);
        }
        spool.housekeeping().await;
        assert_eq!(spool.record_count(), 4, "1 and 2 are done everywhere");
        // No close: the process dies here (positions saved by the last housekeeping only).
    }
    let spool = DiskSpool::open(&options(dir.path())).unwrap();
    assert_eq!(spool.recovery().events, 4);
    let (_wa, mut ra) = spool.open("a", 100);
    let (_wb, mut rb) = spool.open("b", 100);
    assert_eq!(rb.len(), 4);
    assert_eq!(
        ids(&take(&mut rb, 10).await),
        ["3", "4", "5", "6"],
        "b resumes at its first unfinished event"
    );
    let mut buffer = Vec::new();
    let nothing = tokio::time::timeout(Duration::from_millis(200), ra.recv_many(&mut buffer, 10)).await;
    assert!(nothing.is_err(), "a was done with everything and gets nothing again: {:?}", ids(&buffer));
}

#[tokio::test]
async fn an_endpoint_that_falls_behind_reads_from_disk_in_order_then_from_memory_again() {
    let dir = tempfile::tempdir().unwrap();
    let spool = DiskSpool::open(&options(dir.path())).unwrap();
    let (w, mut r) = spool.open("slow", 3);
    let names: Vec<String> = (0..20).map(|i| format!("e{i:02}")).collect();
    for chunk in names.chunks(4) {
        let events: Vec<(&str, &[usize])> = chunk.iter().map(|n| (n.as_str(), &[0usize][..])).collect();
        append(&spool, &[&*w], &events).await.unwrap();
    }
    assert_eq!(w.len(), 20);
    let mut got = Vec::new();
    while got.len() < 20 {
        let batch = take(&mut r, 7).await;
        assert!(batch.len() <= 7);
        got.extend(batch);
    }
    assert_eq!(ids(&got), names, "memory first, then the rest from disk, in order, once each");
    assert_eq!(w.len(), 0);
    // Caught up: new events arrive through memory again (the same envelope, not a copy).
    append(&spool, &[&*w], &[("late", &[0])]).await.unwrap();
    let late = take(&mut r, 10).await;
    assert_eq!(ids(&late), ["late"]);
    assert!(late[0].in_memory(), "served from memory once caught up");
}

#[tokio::test]
async fn events_beyond_the_memory_budget_are_kept_on_disk_only() {
    let dir = tempfile::tempdir().unwrap();
    let spool = DiskSpool::open(&options(dir.path())).unwrap();
    let (w, mut r) = spool.open("a", 100);
    let targets: [&dyn QueueWriter; 1] = [&*w];
    let routed = vec![(envelope("spilled", false), [0usize].into_iter().collect::<EndpointSet>())];
    let Ok(Durability::Pending(rx)) =
        spool.append(Routed { targets: &targets, events: routed, per_target: &[1] })
    else {
        panic!("refused")
    };
    rx.await.unwrap().unwrap();
    let got = take(&mut r, 10).await;
    assert_eq!(ids(&got), ["spilled"]);
    assert!(!got[0].in_memory(), "read back from disk, not held in memory");
}

#[tokio::test]
async fn a_full_spool_refuses_and_gives_the_events_back() {
    let dir = tempfile::tempdir().unwrap();
    let spool = DiskSpool::open(&SpoolOptions { max_bytes: 1000, ..options(dir.path()) }).unwrap();
    let (w, mut r) = spool.open("a", 100);
    let mut accepted = 0;
    let refusal = loop {
        match append(&spool, &[&*w], &[("x", &[0])]).await {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
    };
    assert!(accepted > 0);
    let ReserveError::SpoolFull { used, limit } = refusal else { panic!("{refusal:?}") };
    assert_eq!(limit, 1000);
    assert!(used <= 1000);
    // Room comes back once the endpoint is done with its events (whole buckets at a time, so
    // after housekeeping deletes them).
    for e in take(&mut r, 100).await {
        r.done(&e);
    }
    spool.housekeeping().await;
    assert!(spool.stored_bytes() <= used);
}

#[tokio::test]
async fn an_unwritable_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"").unwrap();
    let err = DiskSpool::open(&SpoolOptions { path: file.join("spool"), ..options(dir.path()) }).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("not-a-dir") && message.contains("spool.path"), "{message}");
}

#[tokio::test]
async fn a_second_process_on_the_same_spool_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = DiskSpool::open(&options(dir.path())).unwrap();
    let err = DiskSpool::open(&options(dir.path())).unwrap_err();
    assert!(matches!(err, SpoolError::Locked { .. }), "{err}");
}

#[tokio::test]
async fn a_damaged_record_and_what_follows_are_cut_off_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = DiskSpool::open(&options(dir.path())).unwrap();
        let (w, _r) = spool.open("a", 100);
        append(&spool, &[&*w], &[("1", &[0]), ("2", &[0]), ("3", &[0])]).await.unwrap();
        spool.close();
        // Damage record 2 in place (as a bad sector would), behind the spool's back.
        let shared = &spool.shared;
        let mut value = shared.events.get(2u64.to_be_bytes()).unwrap().unwrap().to_vec();
        let last = value.len() - 1;
        value[last] ^= 0xff;
        shared.events.insert(2u64.to_be_bytes(), value).unwrap();
        shared.db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let spool = DiskSpool::open(&options(dir.path())).unwrap();
    let damage = spool.recovery().damaged.clone().expect("the damage was reported");
    assert_eq!((damage.first_seq, damage.last_seq, damage.records), (2, 3, 2));
    assert!(damage.reason.contains("checksum"), "{}", damage.reason);
    let (_w, mut r) = spool.open("a", 100);
    assert_eq!(ids(&take(&mut r, 10).await), ["1"], "the intact prefix is kept");
    drop((spool, r, _w));
    // The cut is permanent: the next start finds nothing damaged.
    let spool = DiskSpool::open(&options(dir.path()));
    assert!(spool.is_ok_and(|s| s.recovery().damaged.is_none()));
}

#[tokio::test]
async fn events_of_a_removed_endpoint_are_released_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = DiskSpool::open(&options(dir.path())).unwrap();
        let (wa, _ra) = spool.open("a", 100);
        let (wb, _rb) = spool.open("gone", 100);
        append(&spool, &[&*wa, &*wb], &[("1", &[0, 1]), ("2", &[1])]).await.unwrap();
        spool.close();
    }
    let spool = DiskSpool::open(&options(dir.path())).unwrap();
    let (_wa, mut ra) = spool.open("a", 100);
    assert_eq!(spool.release_unclaimed(), [("gone".to_owned(), 2)]);
    for e in take(&mut ra, 10).await {
        ra.done(&e);
    }
    spool.housekeeping().await;
    assert_eq!(spool.record_count(), 0, "nobody is waiting for the removed endpoint's events");
}

#[tokio::test]
async fn a_replaced_endpoint_drains_its_own_events_and_the_new_one_takes_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let spool = DiskSpool::open(&options(dir.path())).unwrap();
    let (old_w, mut old_r) = spool.open("a", 100);
    append(&spool, &[&*old_w], &[("old", &[0])]).await.unwrap();
    // The endpoint's configuration changes: a new consumer starts, the old one is closed.
    let (new_w, mut new_r) = spool.open("a", 100);
    drop(old_w);
    append(&spool, &[&*new_w], &[("new", &[0])]).await.unwrap();
    let old = take(&mut old_r, 10).await;
    assert_eq!(ids(&old), ["old"]);
    old_r.done(&old[0]);
    let mut buffer = Vec::new();
    assert_eq!(old_r.recv_many(&mut buffer, 10).await, 0, "the old consumer ends once drained");
    assert_eq!(ids(&take(&mut new_r, 10).await), ["new"]);
}

#[tokio::test]
async fn after_a_failed_write_the_spool_refuses_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let spool = DiskSpool::open(&options(dir.path())).unwrap();
    let (w, _r) = spool.open("a", 100);
    assert_eq!(spool.failure(), None);
    // What a failed sync does (a real one needs a failing disk).
    fail(&spool.shared, "I/O error");
    let refusal = append(&spool, &[&*w], &[("1", &[0])]).await.unwrap_err();
    assert!(matches!(refusal, ReserveError::Storage(_)), "{refusal:?}");
    assert!(spool.failure().is_some_and(|f| f.contains("restart twinroute")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_requests_are_gathered_into_shared_writes_and_all_stored() {
    let dir = tempfile::tempdir().unwrap();
    let spool =
        DiskSpool::open(&SpoolOptions { commit_interval: Duration::from_millis(2), ..options(dir.path()) })
            .unwrap();
    let (w, mut r) = spool.open("a", 10_000);
    let w: Arc<dyn QueueWriter> = Arc::from(w);
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (spool, w) = (spool.clone(), w.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let id = format!("{t}-{i}");
                append(&spool, &[&*w], &[(id.as_str(), &[0])]).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 400 {
        got.extend(take(&mut r, 1000).await);
    }
    let unique: std::collections::HashSet<String> = ids(&got).into_iter().collect();
    assert_eq!(unique.len(), 400, "every acknowledged event, once");
}

//! The durable spool's workload, on each candidate engine: ingest appends events in groups and
//! makes each group durable with one sync (group commit), each endpoint reads from its own
//! position, and an event is deleted once every endpoint is done with it.
//!
//! `cargo run --release -- [events] [group]` (defaults 20000 events of 1 KiB, groups of 64).

use std::time::{Duration, Instant};

const EVENT_BYTES: usize = 1024;

struct Result {
    engine: &'static str,
    append: Duration,
    consume: Duration,
}

fn event(i: u64) -> Vec<u8> {
    let mut v = vec![b'x'; EVENT_BYTES];
    v[..8].copy_from_slice(&i.to_be_bytes());
    v
}

fn redb_run(events: u64, group: u64) -> Result {
    use redb::{Database, Durability, ReadableDatabase, TableDefinition};
    const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
    let dir = tempfile::tempdir().unwrap();
    let db = Database::create(dir.path().join("spool.redb")).unwrap();
    let started = Instant::now();
    let mut i = 0;
    while i < events {
        let mut tx = db.begin_write().unwrap();
        tx.set_durability(Durability::Immediate).unwrap();
        {
            let mut table = tx.open_table(EVENTS).unwrap();
            for j in i..(i + group).min(events) {
                table.insert(j, event(j).as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
        i += group;
    }
    let append = started.elapsed();
    let started = Instant::now();
    let mut i = 0;
    while i < events {
        let read = db.begin_read().unwrap();
        let table = read.open_table(EVENTS).unwrap();
        let n = table.range(i..(i + group).min(events)).unwrap().count() as u64;
        assert_eq!(n, (i + group).min(events) - i);
        drop(table);
        drop(read);
        let mut tx = db.begin_write().unwrap();
        tx.set_durability(Durability::Immediate).unwrap();
        {
            let mut table = tx.open_table(EVENTS).unwrap();
            for j in i..(i + group).min(events) {
                table.remove(j).unwrap();
            }
        }
        tx.commit().unwrap();
        i += group;
    }
    Result { engine: "redb 4", append, consume: started.elapsed() }
}

fn fjall_run(events: u64, group: u64) -> Result {
    use fjall::{Database, KeyspaceCreateOptions, PersistMode};
    let dir = tempfile::tempdir().unwrap();
    let db = Database::builder(dir.path()).open().unwrap();
    let spool = db.keyspace("events", KeyspaceCreateOptions::default).unwrap();
    let started = Instant::now();
    let mut i = 0;
    while i < events {
        let mut batch = db.batch();
        for j in i..(i + group).min(events) {
            batch.insert(&spool, j.to_be_bytes(), event(j));
        }
        batch.commit().unwrap();
        db.persist(PersistMode::SyncAll).unwrap();
        i += group;
    }
    let append = started.elapsed();
    let started = Instant::now();
    let mut i = 0;
    while i < events {
        let end = (i + group).min(events);
        let n = spool.range(i.to_be_bytes()..end.to_be_bytes()).count() as u64;
        assert_eq!(n, end - i);
        let mut batch = db.batch();
        for j in i..end {
            batch.remove(&spool, j.to_be_bytes());
        }
        batch.commit().unwrap();
        db.persist(PersistMode::SyncAll).unwrap();
        i += group;
    }
    Result { engine: "fjall 3", append, consume: started.elapsed() }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let events: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let group: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    println!("{events} events of {EVENT_BYTES} B, groups of {group} (one sync per group)");
    println!("| engine | append events/s | consume (read + delete) events/s |");
    println!("|---|---|---|");
    for r in [redb_run(events, group), fjall_run(events, group)] {
        let rate = |d: Duration| events as f64 / d.as_secs_f64();
        println!("| {} | {:.0} | {:.0} |", r.engine, rate(r.append), rate(r.consume));
    }
}

//! Fault test: producers and consumers in several processes, SIGKILLed at
//! random moments over many rounds; afterwards every delivered message must
//! be intact, none delivered twice, none invented, and the counts must add
//! up (at most one message per killed process is unaccounted for: the one
//! it had finished putting but not yet logged, or had taken but not yet
//! logged).
//!
//! `PROC_SOAK=1` runs 200 rounds instead of 12.

mod common;

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proc::{GetError, JoinHandle, Queue};
use serde::{Deserialize, Serialize};

fn main() {
    common::run(&[("sigkill_at_random_moments", 300, sigkill_at_random_moments)]);
}

#[derive(Debug, Serialize, Deserialize)]
enum Msg {
    /// A checksummed payload, small or streamed.
    Full {
        producer: u32,
        seq: u32,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        check: u64,
    },
    /// At most 8 bytes encoded — variant, producer and number as varints,
    /// at most 1 + 1 + 3 bytes for the ids and counts a round reaches — so
    /// a compact 16-byte record: it is right if its producer made a tiny
    /// message with that number.
    Tiny { producer: u32, seq: u32 },
}

impl Msg {
    fn id(&self) -> (u32, u32) {
        match *self {
            Msg::Full { producer, seq, .. } | Msg::Tiny { producer, seq } => (producer, seq),
        }
    }
}

fn checksum(producer: u32, seq: u32, payload: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ (u64::from(producer) << 32 | u64::from(seq));
    for &b in payload {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn make(producer: u32, seq: u32) -> Msg {
    let mut x =
        (u64::from(producer) << 32 | u64::from(seq)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // A third tiny; of the rest, mostly small, one in 16 larger than half
    // the 16 KiB ring (streamed).
    if next() % 3 == 0 {
        return Msg::Tiny { producer, seq };
    }
    let len = if next() % 16 == 0 {
        9_000 + (next() % 12_000) as usize
    } else {
        (next() % 200) as usize
    };
    let payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
    let check = checksum(producer, seq, &payload);
    Msg::Full {
        producer,
        seq,
        payload,
        check,
    }
}

fn valid(m: &Msg) -> bool {
    match (m, make(m.id().0, m.id().1)) {
        (
            Msg::Full {
                producer,
                seq,
                payload,
                check,
            },
            Msg::Full { payload: made, .. },
        ) => *check == checksum(*producer, *seq, payload) && *payload == made,
        (Msg::Tiny { .. }, Msg::Tiny { .. }) => true,
        _ => false,
    }
}

fn append(path: &Path, line: &str) {
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .expect("log");
    f.write_all(line.as_bytes()).expect("log write");
}

fn producer(q: Queue<Msg>, id: u32, log: PathBuf) {
    for seq in 0.. {
        q.put(make(id, seq)).expect("put");
        append(&log, &format!("{seq}\n"));
    }
}

fn consumer(q: Queue<Msg>, log: PathBuf) {
    loop {
        match q.get() {
            Ok(m) => {
                if !valid(&m) {
                    append(&log, "BAD\n");
                    proc::exit(3);
                }
                let (p, s) = m.id();
                append(&log, &format!("{p} {s}\n"));
            }
            Err(GetError::Closed) => return,
            Err(e) => {
                append(&log, &format!("ERR {e}\n"));
                proc::exit(4);
            }
        }
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

enum Role {
    Producer,
    Consumer,
}

fn sigkill_at_random_moments() {
    let rounds = if std::env::var_os("PROC_SOAK").is_some() {
        200
    } else {
        12
    };
    let dir = common::temp_dir("queue-faults");
    let mut rng = Rng(0x1234_5678_9abc_def1 ^ u64::from(std::process::id()));
    let (mut total_delivered, mut total_kills) = (0usize, 0usize);
    for round in 0..rounds {
        let q: Queue<Msg> = Queue::builder().capacity(16 * 1024).build().expect("queue");
        let mut next_id = 0u32;
        let mut workers: Vec<(Role, JoinHandle<()>)> = Vec::new();
        let start = |role: Role, next_id: &mut u32| -> (Role, JoinHandle<()>) {
            let q = q.clone();
            match role {
                Role::Producer => {
                    let id = *next_id;
                    *next_id += 1;
                    let log = dir.join(format!("r{round}-p{id}"));
                    (
                        Role::Producer,
                        proc::spawn(move || producer(q, id, log)).expect("spawn"),
                    )
                }
                Role::Consumer => {
                    let log = dir.join(format!("r{round}-c{next_id}"));
                    *next_id += 1;
                    (
                        Role::Consumer,
                        proc::spawn(move || consumer(q, log)).expect("spawn"),
                    )
                }
            }
        };
        for _ in 0..2 {
            workers.push(start(Role::Producer, &mut next_id));
            workers.push(start(Role::Consumer, &mut next_id));
        }
        let (mut producer_kills, mut consumer_kills) = (0usize, 0usize);
        let until = Instant::now() + Duration::from_millis(250);
        while Instant::now() < until {
            std::thread::sleep(Duration::from_micros(500 + rng.next() % 15_000));
            let victim = (rng.next() % workers.len() as u64) as usize;
            let (role, handle) = workers.swap_remove(victim);
            handle.kill().expect("kill");
            let err = handle.join().expect_err("killed");
            assert!(
                matches!(err, proc::JoinError::Signaled { signal: 9, .. }),
                "{err}"
            );
            match role {
                Role::Producer => producer_kills += 1,
                Role::Consumer => consumer_kills += 1,
            }
            workers.push(start(role, &mut next_id));
        }
        // Stop everyone (also by SIGKILL), then drain what is left.
        for (role, handle) in workers.drain(..) {
            handle.kill().expect("kill");
            let _ = handle.join();
            match role {
                Role::Producer => producer_kills += 1,
                Role::Consumer => consumer_kills += 1,
            }
        }
        let left = q.qsize();
        let mut drained = Vec::new();
        loop {
            match q.try_get() {
                Ok(m) => {
                    assert!(valid(&m), "round {round}: a drained message is corrupted");
                    drained.push(m.id());
                }
                Err(GetError::Empty) => break,
                Err(e) => panic!("round {round}: drain failed: {e}"),
            }
        }
        // A message larger than half the ring whose consumer died midway
        // cannot be delivered whole: the next get skips the rest of it and
        // counts it as taken. At most one per killed consumer.
        let orphaned = left.checked_sub(drained.len()).unwrap_or_else(|| {
            panic!(
                "round {round}: drained {} messages, qsize said {left}",
                drained.len()
            )
        });
        assert!(
            orphaned <= consumer_kills,
            "round {round}: qsize {left}, drained {}",
            drained.len()
        );
        assert!(q.empty());

        // What the logs say.
        let mut put: HashMap<u32, u32> = HashMap::new(); // producer -> seqs logged
        let mut delivered: Vec<(u32, u32)> = drained;
        for entry in std::fs::read_dir(&dir).expect("dir").flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with(&format!("r{round}-")) {
                continue;
            }
            let mut text = std::fs::read_to_string(entry.path()).expect("log");
            // A process killed in the middle of its log append (a write
            // that straddles a page boundary stops between pages when a
            // fatal signal is pending) leaves a partial last line: that
            // entry was never logged.
            let whole = text.rfind('\n').map_or(0, |i| i + 1);
            text.truncate(whole);
            if let Some(id) = name.strip_prefix(&format!("r{round}-p")) {
                let id: u32 = id.parse().expect("producer id");
                put.insert(id, text.lines().count() as u32);
            } else {
                for line in text.lines() {
                    assert!(
                        !line.starts_with("BAD"),
                        "round {round}: a consumer got a corrupted message"
                    );
                    assert!(
                        !line.starts_with("ERR"),
                        "round {round}: a consumer failed: {line}"
                    );
                    let mut it = line.split(' ').map(|s| s.parse::<u32>().expect("number"));
                    delivered.push((it.next().expect("producer"), it.next().expect("seq")));
                }
            }
        }
        let unique: HashSet<(u32, u32)> = delivered.iter().copied().collect();
        assert_eq!(
            unique.len(),
            delivered.len(),
            "round {round}: a message was delivered twice"
        );
        for &(p, s) in &unique {
            let logged = put.get(&p).copied().unwrap_or(0);
            // At most the one put that finished before its producer was
            // killed, before it could log it.
            assert!(
                s <= logged,
                "round {round}: message {p}/{s} was never put (logged {logged})"
            );
        }
        let missing = put
            .iter()
            .flat_map(|(&p, &n)| (0..n).map(move |s| (p, s)))
            .filter(|m| !unique.contains(m))
            .count();
        assert!(
            missing <= consumer_kills,
            "round {round}: {missing} logged puts never delivered, only {consumer_kills} consumers killed"
        );
        total_delivered += unique.len();
        total_kills += producer_kills + consumer_kills;
    }
    println!("({rounds} rounds, {total_delivered} messages delivered, {total_kills} processes SIGKILLed)");
    let _ = std::fs::remove_dir_all(dir);
}

//! The seed's "queue" section: `Queue(maxsize)`, `put` / `get` with
//! `block` and `timeout`, `full`, `empty`, `qsize`, `close`.
//!
//! Run: `cargo run --example queue`

use std::time::Duration;

use proc::{GetError, PutError, Queue};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // q = Queue(maxsize=3): a queue of at most 3 messages, in shared memory.
    let q: Queue<String> = Queue::with_maxsize(3)?;
    println!(
        "new queue: qsize={} empty={} full={}",
        q.qsize(),
        q.empty(),
        q.full()
    );

    // put(data): blocks while the queue is full.
    for word in ["alpha", "beta", "gamma"] {
        q.put(word.to_owned())?;
    }
    println!("after 3 puts: qsize={} full={}", q.qsize(), q.full());

    // put(data, block=False): Full at once, and the item comes back.
    match q.try_put("delta".to_owned()) {
        Err(PutError::Full(item)) => println!("try_put({item:?}): queue full"),
        other => println!("try_put: {other:?}"),
    }
    // put(data, timeout=0.1): waits, then Timeout with the item.
    match q.put_timeout("delta".to_owned(), Duration::from_millis(100)) {
        Err(PutError::Timeout(item)) => println!("put_timeout({item:?}, 100 ms): timed out"),
        other => println!("put_timeout: {other:?}"),
    }

    // A child process takes the messages: the queue is shared across fork.
    let consumer = q.clone();
    let child = proc::spawn(move || {
        let mut got = Vec::new();
        // get(): blocks while empty; Closed once the queue is closed and drained.
        loop {
            match consumer.get() {
                Ok(msg) => got.push(msg),
                Err(GetError::Closed) => break,
                Err(e) => panic!("{e}"),
            }
        }
        got
    })?;
    q.put("delta".to_owned())?; // room again as soon as the child takes one
    q.close(); // no more puts: the child drains what is left, then stops
    println!("child got {:?}", child.join()?);
    println!("after close: qsize={} empty={}", q.qsize(), q.empty());

    // get(block=False) and get(timeout=...) on an empty queue.
    let empty: Queue<u32> = Queue::new()?;
    match empty.try_get() {
        Err(GetError::Empty) => println!("try_get on an empty queue: Empty"),
        other => println!("try_get: {other:?}"),
    }
    match empty.get_timeout(Duration::from_millis(50)) {
        Err(GetError::Timeout) => println!("get_timeout(50 ms) on an empty queue: Timeout"),
        other => println!("get_timeout: {other:?}"),
    }
    // A closed queue refuses puts and hands the item back.
    empty.close();
    if let Err(PutError::Closed(n)) = empty.put(7) {
        println!("put(7) on a closed queue: Closed, got {n} back");
    }
    Ok(())
}

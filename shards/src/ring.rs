//! Bounded lock-free rings between threads, with wake-ups.
//!
//! Every queue that crosses a thread boundary in meshd is one of these: a fixed-capacity
//! `crossbeam_queue::ArrayQueue` (lock-free, allocation-free after creation) plus
//! - an [`AtomicWaker`] for the single consumer, so an idle consumer sleeps in its reactor
//!   (glommio's or tokio's) instead of spinning, and
//! - an [`Event`] for producers waiting for room, so a full ring applies backpressure instead
//!   of growing.
//!
//! Runtime-agnostic on purpose: the same ring connects a glommio shard to the tokio api thread.
//!
//! A ring is bounded twice: in items (the slots of the array) and, for items that carry
//! payloads, in bytes ([`weighed_ring`]): 4096 slots of 64 KiB messages would be 256 MiB and a
//! second of queueing, so the byte bound is the one that bites for data. One item may take the
//! byte gauge past its bound (so an item bigger than the bound still passes an empty ring); the
//! next push then finds the ring full.
//!
//! **Invariant:** the bounds never change; a push on a full ring either hands the item back
//! ([`Producer::try_push`]) or waits for room ([`Producer::push`]). Nothing is dropped silently.
//! **Invariant:** exactly one [`Consumer`] exists per ring (it is not `Clone`).

use std::{
    fmt,
    future::poll_fn,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering, fence},
    },
    task::Poll,
};

use atomic_waker::AtomicWaker;
use crossbeam_queue::ArrayQueue;
use event_listener::{Event, listener};

struct Shared<T> {
    queue: ArrayQueue<T>,
    /// Bytes of the items in the ring, as `weigh` counts them.
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    weigh: fn(&T) -> usize,
    consumer_waker: AtomicWaker,
    /// Set by the consumer before it sleeps: producers wake it only then, so a busy consumer
    /// costs a producer one load per push instead of a read-modify-write on the waker.
    consumer_sleeping: AtomicBool,
    room: Event,
    n_producers: AtomicUsize,
    consumer_alive: AtomicBool,
}

/// The sending end; clone it to give several threads a way in (the queue is MPSC-safe).
pub struct Producer<T> {
    shared: Arc<Shared<T>>,
}

/// The single receiving end.
pub struct Consumer<T> {
    shared: Arc<Shared<T>>,
}

/// Why a push did not happen; the item is handed back either way.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError<T> {
    /// The ring is at capacity; retry later or drop and count.
    Full(T),
    /// The consumer is gone (its thread stopped); the item can never be delivered.
    Closed(T),
}

impl<T> PushError<T> {
    /// Returns the item that was not pushed.
    pub fn into_inner(self) -> T {
        match self {
            Self::Full(t) | Self::Closed(t) => t,
        }
    }
}

impl<T> fmt::Display for PushError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full(_) => f.write_str("ring is full"),
            Self::Closed(_) => f.write_str("ring consumer has stopped"),
        }
    }
}

fn weightless<T>(_: &T) -> usize {
    0
}

/// Creates a ring holding at most `capacity` items, of no weight (the byte bound never bites).
///
/// # Panics
/// If `capacity` is 0: a zero-capacity ring could never carry anything, so it is a bug in the
/// caller's configuration validation.
pub fn ring<T>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    weighed_ring(capacity, usize::MAX, weightless)
}

/// Creates a ring holding at most `capacity` items and about `max_bytes` of them as `weigh`
/// counts (one item may go past the byte bound; see the module docs).
///
/// # Panics
/// If `capacity` or `max_bytes` is 0 (a bug in the caller's configuration validation).
pub fn weighed_ring<T>(
    capacity: usize,
    max_bytes: usize,
    weigh: fn(&T) -> usize,
) -> (Producer<T>, Consumer<T>) {
    assert!(capacity > 0, "ring capacity must be positive");
    assert!(max_bytes > 0, "ring byte bound must be positive");
    let shared = Arc::new(Shared {
        queue: ArrayQueue::new(capacity),
        queued_bytes: AtomicUsize::new(0),
        max_bytes,
        weigh,
        consumer_waker: AtomicWaker::new(),
        consumer_sleeping: AtomicBool::new(false),
        room: Event::new(),
        n_producers: AtomicUsize::new(1),
        consumer_alive: AtomicBool::new(true),
    });
    (
        Producer {
            shared: Arc::clone(&shared),
        },
        Consumer { shared },
    )
}

impl<T> Producer<T> {
    /// Pushes without waiting; hands the item back when the ring is full or closed.
    pub fn try_push(&self, item: T) -> Result<(), PushError<T>> {
        let shared = &*self.shared;
        if !shared.consumer_alive.load(Ordering::Acquire) {
            return Err(PushError::Closed(item));
        }
        if shared.queued_bytes.load(Ordering::Acquire) >= shared.max_bytes {
            return Err(PushError::Full(item));
        }
        // Counted before the push, so the consumer never releases bytes not yet added.
        let weight = (shared.weigh)(&item);
        if weight > 0 {
            shared.queued_bytes.fetch_add(weight, Ordering::AcqRel);
        }
        match shared.queue.push(item) {
            Ok(()) => {
                // Pairs with the consumer's fence between announcing sleep and re-checking:
                // either it sees this item or this push sees it sleeping.
                fence(Ordering::SeqCst);
                if shared.consumer_sleeping.load(Ordering::Relaxed) {
                    shared.consumer_waker.wake();
                }
                Ok(())
            }
            Err(item) => {
                if weight > 0 {
                    shared.queued_bytes.fetch_sub(weight, Ordering::AcqRel);
                }
                Err(PushError::Full(item))
            }
        }
    }

    /// Pushes, waiting for room while the ring is full (backpressure).
    ///
    /// Returns the item back only if the consumer has stopped.
    pub async fn push(&self, mut item: T) -> Result<(), T> {
        loop {
            match self.try_push(item) {
                Ok(()) => return Ok(()),
                Err(PushError::Closed(back)) => return Err(back),
                Err(PushError::Full(back)) => item = back,
            }
            listener!(self.shared.room => room);
            // Re-check after registering, or a pop between the failed push and the
            // registration would be missed and this producer would sleep forever.
            match self.try_push(item) {
                Ok(()) => return Ok(()),
                Err(PushError::Closed(back)) => return Err(back),
                Err(PushError::Full(back)) => item = back,
            }
            room.await;
        }
    }

    /// Number of items waiting in the ring.
    pub fn len(&self) -> usize {
        self.shared.queue.len()
    }

    /// Whether the ring is empty.
    pub fn is_empty(&self) -> bool {
        self.shared.queue.is_empty()
    }

    /// Bytes waiting in the ring (0 for a ring of weightless items).
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued_bytes.load(Ordering::Acquire)
    }

    /// Whether the consumer has stopped.
    pub fn is_closed(&self) -> bool {
        !self.shared.consumer_alive.load(Ordering::Acquire)
    }
}

impl<T> Clone for Producer<T> {
    fn clone(&self) -> Self {
        self.shared.n_producers.fetch_add(1, Ordering::AcqRel);
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T> Drop for Producer<T> {
    fn drop(&mut self) {
        if self.shared.n_producers.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Last producer: the consumer must learn that no more items will come.
            self.shared.consumer_waker.wake();
        }
    }
}

impl<T> Consumer<T> {
    /// Pops without waiting.
    pub fn try_pop(&self) -> Option<T> {
        let shared = &*self.shared;
        let item = shared.queue.pop()?;
        let weight = (shared.weigh)(&item);
        if weight > 0 {
            shared.queued_bytes.fetch_sub(weight, Ordering::AcqRel);
            // Freed bytes may make room for several small items: wake every waiter.
            shared.room.notify(usize::MAX);
        } else {
            shared.room.notify(1);
        }
        Some(item)
    }

    /// Waits for the next item; `None` once every producer is gone and the ring is drained.
    pub async fn pop(&self) -> Option<T> {
        poll_fn(|cx| {
            let shared = &*self.shared;
            if let Some(item) = self.try_pop() {
                if shared.consumer_sleeping.load(Ordering::Relaxed) {
                    shared.consumer_sleeping.store(false, Ordering::Relaxed);
                }
                return Poll::Ready(Some(item));
            }
            shared.consumer_waker.register(cx.waker());
            shared.consumer_sleeping.store(true, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            // Re-check after announcing: a push that happened in between woke nobody.
            if let Some(item) = self.try_pop() {
                shared.consumer_sleeping.store(false, Ordering::Relaxed);
                return Poll::Ready(Some(item));
            }
            if self.shared.n_producers.load(Ordering::Acquire) == 0 {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await
    }

    /// Number of items waiting.
    pub fn len(&self) -> usize {
        self.shared.queue.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.shared.queue.is_empty()
    }

    /// The fixed capacity of the ring.
    pub fn capacity(&self) -> usize {
        self.shared.queue.capacity()
    }

    /// Bytes waiting in the ring (0 for a ring of weightless items).
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued_bytes.load(Ordering::Acquire)
    }
}

impl<T> Drop for Consumer<T> {
    fn drop(&mut self) {
        self.shared.consumer_alive.store(false, Ordering::Release);
        // Producers blocked on a full ring must learn the consumer is gone.
        self.shared.room.notify(usize::MAX);
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;

    #[test]
    fn a_full_ring_hands_the_item_back() {
        let (tx, rx) = ring::<u32>(2);
        tx.try_push(1).unwrap();
        tx.try_push(2).unwrap();
        assert_eq!(tx.try_push(3), Err(PushError::Full(3)));
        assert_eq!(rx.try_pop(), Some(1));
        tx.try_push(3).unwrap();
        assert_eq!(rx.capacity(), 2);
    }

    #[test]
    fn a_weighed_ring_is_bounded_in_bytes_and_pops_give_them_back() {
        let (tx, rx) = weighed_ring::<Vec<u8>>(4096, 100, Vec::len);
        // One item may take the gauge past the bound; after it the ring is full.
        tx.try_push(vec![0; 99]).unwrap();
        tx.try_push(vec![0; 50]).unwrap();
        assert!(matches!(tx.try_push(vec![0; 1]), Err(PushError::Full(_))));
        assert_eq!(tx.queued_bytes(), 149);
        assert_eq!(rx.try_pop().map(|v| v.len()), Some(99));
        tx.try_push(vec![0; 1]).unwrap();
        assert_eq!(rx.queued_bytes(), 51);
        // A waiting producer is woken by the bytes a pop frees, not only by a slot.
        tx.try_push(vec![0; 60]).unwrap();
        let waiter = thread::spawn(move || futures_lite::future::block_on(tx.push(vec![0; 5])));
        thread::sleep(std::time::Duration::from_millis(20));
        while rx.try_pop().is_some() {}
        waiter.join().unwrap().unwrap();
        assert_eq!(rx.try_pop().map(|v| v.len()), Some(5));
        assert_eq!(rx.queued_bytes(), 0);
    }

    #[test]
    fn a_push_after_the_consumer_stopped_is_refused() {
        let (tx, rx) = ring::<u32>(2);
        drop(rx);
        assert_eq!(tx.try_push(1), Err(PushError::Closed(1)));
        assert_eq!(futures_lite::future::block_on(tx.push(2)), Err(2));
    }

    #[test]
    fn pop_ends_when_every_producer_is_gone_and_the_ring_is_drained() {
        let (tx, rx) = ring::<u32>(4);
        let tx2 = tx.clone();
        tx.try_push(7).unwrap();
        drop(tx);
        drop(tx2);
        assert_eq!(futures_lite::future::block_on(rx.pop()), Some(7));
        assert_eq!(futures_lite::future::block_on(rx.pop()), None);
    }

    #[test]
    fn items_cross_threads_in_order_under_backpressure() {
        let (tx, rx) = ring::<u64>(8);
        let n = 100_000u64;
        let producer = thread::spawn(move || {
            futures_lite::future::block_on(async {
                for i in 0..n {
                    tx.push(i).await.unwrap();
                }
            });
        });
        let got = futures_lite::future::block_on(async {
            let mut expected = 0;
            while let Some(v) = rx.pop().await {
                assert_eq!(v, expected);
                expected += 1;
            }
            expected
        });
        producer.join().unwrap();
        assert_eq!(got, n);
    }
}

//! Group commit: concurrent requests share one transaction.
//!
//! A request puts its job in a [`GroupQueue`] and waits for its answer (each job carries its
//! own reply channel). A few writer tasks take the jobs waiting (as many as arrived while the
//! previous write ran, up to a weight such as `ingest_max_group` events) and write them
//! together; at low load a group is one job, so nothing waits for company. Event ingestion
//! (`ingest::writer`) and contact upserts (`contacts::writer`) use it.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use futures::future::BoxFuture;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

/// Jobs waiting for a writer, at most; senders wait for room beyond that.
const QUEUE: usize = 4096;

type WriteFn<J> = Arc<dyn Fn(Vec<J>) -> BoxFuture<'static, ()> + Send + Sync>;

/// The queue of one process. Its writer tasks start with the first job, on that job's runtime;
/// when `stop` is cancelled (the API has stopped serving) they write what is queued and end,
/// and later jobs are refused.
pub struct GroupQueue<J: Send + 'static> {
    /// The histogram of the jobs per group written (`ingest_group_requests`).
    name: &'static str,
    writers: usize,
    max_weight: usize,
    weight: fn(&J) -> usize,
    write: WriteFn<J>,
    stop: CancellationToken,
    queue: OnceLock<mpsc::Sender<J>>,
}

impl<J: Send + 'static> GroupQueue<J> {
    /// `writers` groups may be written at once, each of jobs weighing up to `max_weight` in
    /// all (a job is never split); `write` writes a group and answers each of its jobs.
    pub fn new<W, F>(
        name: &'static str,
        writers: usize,
        max_weight: usize,
        weight: fn(&J) -> usize,
        stop: CancellationToken,
        write: W,
    ) -> GroupQueue<J>
    where
        W: Fn(Vec<J>) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        GroupQueue {
            name,
            writers: writers.max(1),
            max_weight: max_weight.max(1),
            weight,
            write: Arc::new(move |group| Box::pin(write(group))),
            stop,
            queue: OnceLock::new(),
        }
    }

    /// Whether the queue refuses jobs (the API is stopping).
    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Queues a job; the job back when the queue is stopping.
    pub async fn submit(&self, job: J) -> Result<(), J> {
        if self.stop.is_cancelled() {
            return Err(job);
        }
        self.queue().send(job).await.map_err(|e| e.0)
    }

    fn queue(&self) -> &mpsc::Sender<J> {
        self.queue.get_or_init(|| {
            let (sender, receiver) = mpsc::channel(QUEUE);
            let receiver = Arc::new(Mutex::new(receiver));
            for _ in 0..self.writers {
                tokio::spawn(write_loop(
                    self.name,
                    receiver.clone(),
                    self.max_weight,
                    self.weight,
                    self.write.clone(),
                    self.stop.clone(),
                ));
            }
            sender
        })
    }
}

/// One writer: takes the waiting jobs (one writer at a time collects), writes them. After
/// `stop`, it drains what is queued and returns.
async fn write_loop<J: Send + 'static>(
    name: &'static str,
    queue: Arc<Mutex<mpsc::Receiver<J>>>,
    max_weight: usize,
    weight: fn(&J) -> usize,
    write: WriteFn<J>,
    stop: CancellationToken,
) {
    loop {
        let group = {
            let mut queue = queue.lock().await;
            let next = tokio::select! {
                biased;
                next = queue.recv() => next,
                () = stop.cancelled() => queue.try_recv().ok(),
            };
            let Some(first) = next else {
                return;
            };
            let mut total = weight(&first);
            let mut group = vec![first];
            while total < max_weight {
                match queue.try_recv() {
                    Ok(job) => {
                        total += weight(&job);
                        group.push(job);
                    }
                    Err(_) => break,
                }
            }
            group
        };
        metrics::histogram!(name).record(group.len() as f64);
        write(group).await;
    }
}

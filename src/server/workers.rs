//! The threads a server with more than one worker and `[runtime] scheduler = "per_worker"` serves
//! its listeners on: each runs a single-threaded tokio runtime that drives the accept loops handed
//! to it and every connection they accept, so a connection's task, timers and sockets stay on the thread that
//! accepted it (no work stealing, no wake-ups across threads), and each worker has an accept
//! queue of its own (the listener's `SO_REUSEPORT` siblings). This room starts and stops the
//! threads; what runs on them is the server's to decide.

use std::io;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The worker threads' runtimes, handed out in turn; none with one worker (everything then runs
/// on the runtime that runs the server).
#[derive(Default)]
pub(super) struct Workers {
    handles: Vec<Handle>,
    next: usize,
    /// Ends the threads' runtimes (on drop).
    stop: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` threads when `count` is more than one.
    pub(super) fn start(count: usize) -> io::Result<Workers> {
        let mut workers = Workers::default();
        for i in (0..count).filter(|_| count > 1) {
            let (tell, told) = std::sync::mpsc::channel();
            let stop = workers.stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("fulcrum-w{i}"))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
                    let runtime = match runtime {
                        Ok(runtime) => runtime,
                        Err(e) => return drop(tell.send(Err(e))),
                    };
                    let _ = tell.send(Ok(runtime.handle().clone()));
                    runtime.block_on(stop.cancelled());
                    // Whatever is left (the server has drained) is dropped without waiting for
                    // blocking work such as a name lookup in flight.
                    runtime.shutdown_background();
                })?;
            workers.threads.push(thread);
            let started = told
                .recv()
                .map_err(|_| io::Error::other("a worker thread ended at its start"))?;
            workers.handles.push(started?);
        }
        Ok(workers)
    }

    /// How many workers accept: one per thread, or the caller's runtime alone.
    pub(super) fn count(&self) -> usize {
        self.handles.len().max(1)
    }

    /// The runtime the next accept loop runs on (each worker in turn); `None` with one worker.
    pub(super) fn next(&mut self) -> Option<&Handle> {
        let i = self.next % self.handles.len().max(1);
        self.next = self.next.wrapping_add(1);
        self.handles.get(i)
    }
}

impl Drop for Workers {
    /// Ends the threads, and waits for them: what ran there is dropped (the server has drained).
    fn drop(&mut self) {
        self.stop.cancel();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_runs_on_the_callers_runtime_and_more_each_on_a_thread_of_its_own() {
        let mut one = Workers::start(1).expect("start");
        assert!(one.next().is_none());
        assert_eq!(one.count(), 1);
        let mut three = Workers::start(3).expect("start");
        assert_eq!(three.count(), 3);
        let threads: Vec<String> = (0..6)
            .map(|_| {
                let handle = three.next().expect("a worker").clone();
                let name = handle.spawn(async { std::thread::current().name().map(str::to_owned) });
                wait(name).expect("joined").expect("named")
            })
            .collect();
        assert_eq!(threads, [0, 1, 2, 0, 1, 2].map(|i| format!("fulcrum-w{i}")));
    }

    /// Waits for `task` from outside any runtime.
    fn wait<T: Send + 'static>(task: tokio::task::JoinHandle<T>) -> Result<T, tokio::task::JoinError> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(task)
    }
}

//! Busy polling: after the node handled network input, it looks for more for a short while
//! before the runtime puts the thread to sleep.
//!
//! # Why
//!
//! A consensus instance is a chain of message delays (PROPOSE, WRITE, ACCEPT, reply), and
//! each one that finds its receiver asleep pays for a wake-up: on the 2-core VMs we measure on,
//! a halted vCPU takes ~20 us to wake (a blocking TCP ping-pong on loopback costs 52 us per round
//! trip, a spinning one 7 us), plus the context switch. The next message of an instance usually
//! arrives within tens of microseconds of the last, so polling for a moment catches it awake.
//!
//! # Why it does not starve anyone
//!
//! Each turn hands the CPU back twice: to this runtime's own tasks (the connection readers and
//! writers, which is also how the sockets get polled, without blocking) and to the kernel
//! (`sched_yield`), so any other runnable thread or process goes first. The budget bounds the
//! cost when nothing comes, and polling starts only after input: an idle replica sleeps.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// What one poll found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polled {
    /// Input arrived before the budget ran out.
    Input,
    /// Nothing arrived; the runtime may sleep.
    Idle,
}

/// Polls `rx` for up to `budget`; returns as soon as it holds something.
pub async fn poll_for_input<T>(rx: &mpsc::Receiver<T>, budget: Duration) -> Polled {
    if !rx.is_empty() {
        return Polled::Input;
    }
    let until = Instant::now() + budget;
    loop {
        // The runtime polls its sockets without blocking before it resumes a yielded task, so
        // the connection tasks get to deliver what arrived meanwhile.
        tokio::task::yield_now().await;
        if !rx.is_empty() {
            return Polled::Input;
        }
        if Instant::now() >= until {
            return Polled::Idle;
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn returns_when_input_arrives_on_a_socket() {
        // The input comes through a real socket and a reader task, as in a replica, so this also
        // checks that the runtime polls its sockets while the loop spins on one thread.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let (mut s, _) = listener.accept().await.unwrap();
            let mut b = [0u8; 1];
            while s.read_exact(&mut b).await.is_ok() {
                let _ = tx.send(b[0]).await;
            }
        });
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            s.write_all(&[7]).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        });
        let start = Instant::now();
        assert_eq!(
            poll_for_input(&rx, Duration::from_secs(5)).await,
            Polled::Input
        );
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        writer.join().unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn gives_up_after_the_budget() {
        let (_tx, rx) = mpsc::channel::<u8>(1);
        let start = Instant::now();
        assert_eq!(
            poll_for_input(&rx, Duration::from_millis(5)).await,
            Polled::Idle
        );
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(5), "{took:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn input_already_queued_costs_nothing() {
        let (tx, rx) = mpsc::channel(1);
        tx.send(1u8).await.unwrap();
        assert_eq!(poll_for_input(&rx, Duration::ZERO).await, Polled::Input);
    }
}

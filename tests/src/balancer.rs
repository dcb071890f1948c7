//! A TCP load balancer on loopback, standing in for the Service in front of several
//! control-plane replicas: each connection goes to the next backend, in turn, that
//! accepts it; a backend that is gone refuses and the next one gets the connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

pub struct Balancer {
    addr: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
}

impl Balancer {
    /// Listens on a free loopback port and spreads connections over `backends`.
    pub async fn start(backends: Vec<SocketAddr>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let backends = Arc::new(backends);
        let next = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let backends = backends.clone();
                let first = next.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    for i in 0..backends.len() {
                        let backend = backends[(first + i) % backends.len()];
                        let connect = TcpStream::connect(backend);
                        if let Ok(Ok(mut upstream)) =
                            tokio::time::timeout(Duration::from_secs(2), connect).await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                            return;
                        }
                    }
                    // No backend: the client sees the connection close, as with a Service
                    // without ready endpoints.
                });
            }
        });
        Ok(Self { addr, accept })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

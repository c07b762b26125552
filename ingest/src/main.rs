use clap::Parser;

// One thread: ingest moves each message between a few tasks (poller, packer, acker), and on
// one thread those hand-offs need no cross-thread wake-up (a futex and a context switch each),
// which was most of its CPU per message; the work itself is light and mostly waiting on I/O.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let config = ingest::Config::parse();
    infra::serve::init_tracing(config.log.log_format);
    ingest::run(config, infra::shutdown::on_signal()).await
}

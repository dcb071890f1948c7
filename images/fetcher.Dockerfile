# aether-fetcher: the static musl binary and nothing else.
# Build the binary on the host first (no registry is needed):
#   cargo build --release --locked --target x86_64-unknown-linux-musl -p aether-fetcher
#   docker build -f images/fetcher.Dockerfile -t aether-fetcher:dev .
FROM scratch
COPY target/x86_64-unknown-linux-musl/release/aether-fetcher /aether-fetcher
USER 65532:65532
EXPOSE 9180
ENTRYPOINT ["/aether-fetcher"]

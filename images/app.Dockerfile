# The example app of the container tests: a static HTTP server, no shell, no tar. In a
# dev-hot pod it runs under `aether-fetcher supervise`, copied in by `aether-fetcher install`.
FROM scratch
COPY target/x86_64-unknown-linux-musl/release/aether-example-server /app/server
USER 65532:65532
ENTRYPOINT ["/app/server"]

# The Kubernetes API emulator of the test harness, for container end-to-end tests.
FROM scratch
COPY target/x86_64-unknown-linux-musl/release/aether-kube-emulator /aether-kube-emulator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/aether-kube-emulator", "--listen", "0.0.0.0:8080"]

# aether (control plane and CLI): the static musl binary only, non-root.
#   scripts/build-images.sh builds the binary on the host and this image.
FROM scratch
COPY target/x86_64-unknown-linux-musl/release/aether /aether
USER 65532:65532
EXPOSE 3000
ENTRYPOINT ["/aether"]
CMD ["serve"]

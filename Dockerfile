# syntax=docker/dockerfile:1
# Images of the KmMR replica and operator, from one build stage:
#
#   docker build --target replica  -t kmmr/replica:0.1.0 .
#   docker build --target operator -t kmmr/operator:0.1.0 .
#
# Both run as the distroless nonroot user (65532), which the operator's pod specs and the chart
# also require (runAsNonRoot, read-only root filesystem). Use fixed tags: the chart and the
# BftCluster's spec.image refuse nothing, but a moving tag defeats node image caches.

# The toolchain CI tests with; the workspace's rust-version is the minimum.
ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# The release profile keeps line tables for local profiling; the images strip them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p kmmr-replica --bin kmmr-replica \
        -p kmmr-etcd-gateway --bin kmmr-etcd-gateway \
        -p kmmr-operator --bin kmmr-operator \
 && mkdir -p /out \
 && cp target/release/kmmr-replica target/release/kmmr-etcd-gateway target/release/kmmr-operator /out/ \
 && strip /out/kmmr-replica /out/kmmr-etcd-gateway /out/kmmr-operator

# glibc and libgcc only: the binaries are Rust with rustls (no OpenSSL). The replica image also
# carries the etcd gateway, which the operator runs from spec.image when spec.etcdAPI is enabled.
FROM ${RUNTIME_IMAGE} AS replica
COPY --from=build /out/kmmr-replica /usr/local/bin/kmmr-replica
COPY --from=build /out/kmmr-etcd-gateway /usr/local/bin/kmmr-etcd-gateway
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kmmr-replica"]

FROM ${RUNTIME_IMAGE} AS operator
COPY --from=build /out/kmmr-operator /usr/local/bin/kmmr-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/kmmr-operator"]

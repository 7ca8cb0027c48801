# syntax=docker/dockerfile:1
# One image with the three egressnat binaries:
#   /egressnat-agent     the DaemonSet (runs as root with NET_ADMIN and NET_RAW
#                        only: netlink and nftables need uid 0; see
#                        manifests/base/agent-daemonset.yaml)
#   /egressnat-operator  the Deployment (runs as the image's nonroot user)
#   /egressnatctl        the CLI, also the agent's init container
#                        (prepare-node) and usable with kubectl exec on a node
#
#   docker build -t ghcr.io/egressnat/egressnat:v0.1.0 .
# test/deploy parses this file, so a broken Dockerfile fails CI.

ARG GO_VERSION=1.26

FROM golang:${GO_VERSION} AS build
WORKDIR /src
# Modules first, so that a source change does not download them again.
COPY go.mod go.sum ./
RUN go mod download
COPY api/ api/
COPY cmd/ cmd/
COPY gateway/ gateway/
COPY leader/ leader/
COPY nft/ nft/
COPY selector/ selector/
ARG TARGETOS=linux
ARG TARGETARCH=amd64
RUN CGO_ENABLED=0 GOOS=${TARGETOS} GOARCH=${TARGETARCH} \
    go build -trimpath -ldflags="-s -w" -o /out/ ./cmd/...

# Static binaries need no libc: distroless static (CA certificates, tzdata,
# /etc/passwd with nonroot 65532) and nothing else, no shell.
FROM gcr.io/distroless/static-debian12:nonroot AS runtime
LABEL org.opencontainers.image.source="https://github.com/egressnat/egressnat" \
      org.opencontainers.image.description="egressnat: egress NAT gateway for Kubernetes (agent, operator, egressnatctl)"
COPY --from=build /out/egressnat-agent /out/egressnat-operator /out/egressnatctl /
USER 65532:65532
ENTRYPOINT ["/egressnat-operator"]
